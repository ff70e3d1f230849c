"""Fast recovery in the reconciler: a job whose worker process is known dead is re-queued at
once (worker.identity), a broker that lost its messages gets every queued job again, and a
broker that refuses sends does not slow a pass down. On real SQLite and PostgreSQL databases."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta

import sqlalchemy as sa

from service import job_runs
from service.db import Database
from service.ids import utcnow
from service.settings import Settings
from service.tables import Job
from tests.unit.job_helpers import add_dataset, create, load
from worker import identity
from worker.reconciler import BROKER_RETRY_SECONDS, next_pass_in

HOST = socket.gethostname()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_worker_ids_name_host_pid_incarnation_and_attempt() -> None:
    first, second = identity.new_worker_id(), identity.new_worker_id()
    host, pid, token = first.split(":")
    assert (host, pid) == (HOST, str(os.getpid()))
    incarnation, attempt = token.split(".")
    assert len(attempt) == 6
    assert incarnation == identity.incarnation() and second.split(":")[2].startswith(incarnation)
    assert first != second  # each attempt is fenced on its own


def test_which_holders_are_known_dead() -> None:
    me = identity.new_worker_id()
    assert not identity.holder_is_dead(me)
    # Our own pid, another incarnation: a container restarted (pid 1 again, a new process).
    assert identity.holder_is_dead(f"{HOST}:{os.getpid()}:0badcafe.1234")
    assert identity.holder_is_dead(f"{HOST}:{dead_pid()}:0badcafe.1234")
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as alive:
        try:  # a live pid that is not ours: maybe the holder, maybe a reused pid: unknown
            assert not identity.holder_is_dead(f"{HOST}:{alive.pid}:0badcafe.1234")
        finally:
            alive.kill()
    # Another host's worker, or an id of another form: only its heartbeat can tell.
    assert not identity.holder_is_dead(f"not-{HOST}:{dead_pid()}:0badcafe.1234")
    for odd in ("w1", "", None, f"{HOST}:abc:x", f"{HOST}:1:2:3"):
        assert not identity.holder_is_dead(odd)


def test_a_dead_holders_job_is_requeued_without_waiting_for_the_stale_limit(
    db: Database, settings: Settings
) -> None:
    grace = job_runs.dead_holder_grace(settings)
    assert grace == 3.0 and settings.job_stale_after_seconds == 60
    dead = {f"{HOST}:{dead_pid()}:0badcafe.{n}" for n in ("a", "b")}
    dataset_id = add_dataset(db)
    ids = {name: create(db, dataset_id)[0].id for name in ("dead", "fresh", "live", "cx")}
    t0 = utcnow()
    holders = {
        "dead": sorted(dead)[0],
        "fresh": sorted(dead)[1],
        "live": identity.new_worker_id(),
        "cx": f"{HOST}:{os.getpid()}:0badcafe.c",
    }
    with db.sessionmaker() as session:
        for name, holder in holders.items():
            assert job_runs.claim(session, ids[name], holder, settings, now=t0).claimed
        session.execute(
            sa.update(Job)
            .where(Job.id == ids["cx"])
            .values(status="cancelling", cancel_requested=True)
        )
        session.commit()
        # "fresh" beat 1 s before the pass: its process is gone, but the grace is not over.
        now = t0 + timedelta(seconds=grace + 1)
        assert (
            job_runs.heartbeat(
                session, ids["fresh"], holders["fresh"], now=now - timedelta(seconds=1)
            )
            == "ok"
        )
        sent: list[str] = []
        report = job_runs.reconcile(
            session, settings, sent.append, now=now, holder_is_dead=identity.holder_is_dead
        )
        assert report.requeued == [ids["dead"]] and sent == [ids["dead"]]
        assert report.cancelled == [ids["cx"]]
        assert report.next_due_in is not None and 1.9 < report.next_due_in <= 2.0
        assert next_pass_in(settings, report) == report.next_due_in + 0.1
        # Without the liveness verdict nothing is due before the stale limit.
        assert not job_runs.reconcile(
            session, settings, sent.append, now=now + timedelta(seconds=5)
        )
        later = job_runs.reconcile(
            session,
            settings,
            sent.append,
            now=now + timedelta(seconds=report.next_due_in + 0.1),
            holder_is_dead=identity.holder_is_dead,
        )
        assert later.requeued == [ids["fresh"]] and later.next_due_in is None
    rows = {name: load(db, job_id) for name, job_id in ids.items()}
    assert {n: r.status for n, r in rows.items()} == {
        "dead": "queued",
        "fresh": "queued",
        "live": "running",  # this process holds it: never taken away
        "cx": "cancelled",
    }
    assert rows["dead"].attempts == 1 and rows["dead"].worker_id is None
    with db.sessionmaker() as session:  # the next worker's claim counts a new attempt
        again = job_runs.claim(session, ids["dead"], identity.new_worker_id(), settings)
        assert again.claimed and again.job is not None and again.job.attempts == 2


def test_a_dead_holder_on_its_last_attempt_fails_the_job(db: Database, settings: Settings) -> None:
    job, _ = create(db, add_dataset(db))
    holder = f"{HOST}:{dead_pid()}:0badcafe.1"
    t0 = utcnow()
    with db.sessionmaker() as session:
        assert job_runs.claim(session, job.id, holder, settings, now=t0).claimed
        session.execute(sa.update(Job).where(Job.id == job.id).values(attempts=2))
        session.commit()
        report = job_runs.reconcile(
            session,
            settings,
            [].append,
            now=t0 + timedelta(seconds=10),
            holder_is_dead=identity.holder_is_dead,
        )
    assert report.failed == [job.id]
    row = load(db, job.id)
    assert row.error_code == "worker_lost"
    assert row.error_message == f"the worker process died ({holder}) on attempt 2 of 2"


def test_lost_messages_are_sent_again_at_once(db: Database, settings: Settings) -> None:
    dataset_id = add_dataset(db)
    t0 = utcnow()
    queued = [create(db, dataset_id)[0].id for _ in range(3)]
    running = create(db, dataset_id)[0].id
    with db.sessionmaker() as session:
        session.execute(sa.update(Job).values(enqueued_at=t0, updated_at=t0))
        session.commit()
        assert job_runs.claim(session, running, "w-run", settings, now=t0).claimed
        # Sent 5 s ago: not due by job_resend_after_seconds, and within the send grace.
        now = t0 + timedelta(seconds=5)
        assert job_runs.heartbeat(session, running, "w-run", now=now) == "ok"
        sent: list[str] = []
        assert not job_runs.reconcile(session, settings, sent.append, now=now)
        report = job_runs.reconcile(session, settings, sent.append, now=now, messages_lost=True)
        assert report.forgotten == 3
        assert sorted(report.resent) == sorted(queued) and sorted(sent) == sorted(queued)
    assert {load(db, job_id).enqueued_at for job_id in queued} == {now}
    assert {load(db, job_id).updated_at for job_id in queued} == {t0}  # sending is no change
    assert load(db, running).status == "running"  # its worker carries on


def test_a_refused_send_ends_the_pass_and_the_next_comes_soon(
    db: Database, settings: Settings
) -> None:
    dataset_id = add_dataset(db)
    ids = [create(db, dataset_id)[0].id for _ in range(3)]
    t0 = utcnow()
    with db.sessionmaker() as session:
        session.execute(sa.update(Job).values(enqueued_at=None, updated_at=t0))
        session.commit()
        tried: list[str] = []

        def broker_down(job_id: str) -> None:
            tried.append(job_id)
            raise ConnectionRefusedError("Error 111 connecting to 127.0.0.1:6399")

        now = t0 + timedelta(seconds=30)
        report = job_runs.reconcile(session, settings, broker_down, now=now)
        assert len(tried) == 1 and report.send_failed and not report.resent
        assert next_pass_in(settings, report) == BROKER_RETRY_SECONDS
        sent: list[str] = []
        report = job_runs.reconcile(session, settings, sent.append, now=now)
        assert sorted(report.resent) == sorted(ids) and not report.send_failed
        assert next_pass_in(settings, report) == settings.reconcile_interval_seconds


def test_an_unsent_job_in_its_grace_brings_the_next_pass_forward(
    db: Database, settings: Settings
) -> None:
    job, _ = create(db, add_dataset(db))
    t0 = utcnow()
    with db.sessionmaker() as session:  # recorded while the broker was down: never sent
        session.execute(sa.update(Job).values(enqueued_at=None, updated_at=t0))
        session.commit()
        sent: list[str] = []
        report = job_runs.reconcile(session, settings, sent.append, now=t0 + timedelta(seconds=4))
        assert sent == [] and report.next_due_in == job_runs.SEND_GRACE_SECONDS - 4
        assert next_pass_in(settings, report) == job_runs.SEND_GRACE_SECONDS - 4 + 0.1
        later = t0 + timedelta(seconds=job_runs.SEND_GRACE_SECONDS + 0.1)
        report = job_runs.reconcile(session, settings, sent.append, now=later)
    assert sent == [job.id] and report.resent == [job.id] and report.next_due_in is None
