"""The worker side of the job state machine (service.job_runs): claim, fencing, heartbeats,
finishing, release and the reconciler. On real SQLite and PostgreSQL databases."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from bitcore.train import Progress
from service import job_runs, jobs
from service.db import Database
from service.domain_errors import DomainError
from service.http_errors import status_of
from service.ids import new_id, utcnow
from service.models_store import TrainedModel
from service.schemas import JobPublic
from service.settings import Settings
from service.storage import Storage
from service.tables import Job, Model
from tests.unit.job_helpers import add_dataset, create, load
from worker.runner import JobRun, Throttled, checkpoint_every


def test_claim_is_a_compare_and_set(db: Database, settings: Settings) -> None:
    job, _ = create(db, add_dataset(db))
    with db.sessionmaker() as session:
        first = job_runs.claim(session, job.id, "w1", settings)
        second = job_runs.claim(session, job.id, "w2", settings)
        missing = job_runs.claim(session, "job_" + "b" * 20, "w3", settings)
    assert first.claimed and first.job is not None and first.job.attempts == 1
    assert (second.claimed, second.reason) == (False, "running")
    assert (missing.claimed, missing.reason) == (False, "not_found")
    row = load(db, job.id)
    assert (row.status, row.worker_id, row.attempts) == ("running", "w1", 1)
    assert row.started_at is not None and row.heartbeat_at == row.started_at


def test_a_stale_job_is_reclaimed_and_the_old_worker_is_fenced_off(
    db: Database, settings: Settings
) -> None:
    job, _ = create(db, add_dataset(db))
    t0 = utcnow()
    stale = t0 + timedelta(seconds=settings.job_stale_after_seconds + 1)
    with db.sessionmaker() as session:
        assert job_runs.claim(session, job.id, "w1", settings, now=t0).claimed
        assert not job_runs.claim(
            session, job.id, "w2", settings, now=t0 + timedelta(seconds=30)
        ).claimed
        taken = job_runs.claim(session, job.id, "w2", settings, now=stale)
        assert taken.claimed and taken.job is not None and taken.job.attempts == 2
        assert taken.job.started_at == t0  # the first start is kept
        assert job_runs.heartbeat(session, job.id, "w1") == "lost"
        assert not job_runs.record_progress(session, job.id, "w1", {"step": 3})
        assert _succeed(session, job.id, "w1") is None
        assert job_runs.heartbeat(session, job.id, "w2") == "ok"
    assert load(db, job.id).worker_id == "w2"


def test_a_fenced_off_worker_leaves_the_new_owners_work_dir_alone(
    db: Database, settings: Settings
) -> None:
    # w1 stalled past the stale limit and w2 took the job over; w1 then fails (its dataset
    # index is not on disk) before its heartbeat noticed. w2's checkpoints must survive.
    job, _ = create(db, add_dataset(db))
    t0 = utcnow()
    with db.sessionmaker() as session:
        old = job_runs.claim(session, job.id, "w1", settings, now=t0)
        stale = t0 + timedelta(seconds=settings.job_stale_after_seconds + 1)
        assert job_runs.claim(session, job.id, "w2", settings, now=stale).claimed
    assert old.job is not None
    storage = Storage(settings.artifact_root)
    checkpoint = storage.job_dir(job.id) / "checkpoint.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"w2's progress")
    run = JobRun(db, storage, settings, old.job, "w1", threading.Event())
    assert run.execute() == "lost"
    assert checkpoint.read_bytes() == b"w2's progress"
    after = load(db, job.id)
    assert (after.status, after.worker_id, after.error_code) == ("running", "w2", None)


def test_claim_past_the_attempt_limit_fails_the_job(db: Database, settings: Settings) -> None:
    job, _ = create(db, add_dataset(db))
    now = utcnow()
    step = timedelta(seconds=settings.job_stale_after_seconds + 1)
    with db.sessionmaker() as session:
        assert job_runs.claim(session, job.id, "w1", settings, now=now).claimed
        assert job_runs.claim(session, job.id, "w2", settings, now=now + step).claimed
        refused = job_runs.claim(session, job.id, "w3", settings, now=now + 2 * step)
    assert (refused.claimed, refused.reason) == (False, "too_many_attempts")
    row = load(db, job.id)
    assert (row.status, row.error_code, row.attempts) == ("failed", "too_many_attempts", 2)
    assert JobPublic.from_row(row).model_dump(mode="json")["error"]["code"] == "too_many_attempts"


def test_cancel_transitions(db: Database, settings: Settings) -> None:
    dataset_id = add_dataset(db)
    queued, _ = create(db, dataset_id)
    running, _ = create(db, dataset_id)
    with db.sessionmaker() as session:
        done = jobs.request_cancel(session, None, queued.id)
        assert done.status == "cancelled" and done.finished_at is not None
        # Its message may still be in the broker: the claim refuses it.
        assert job_runs.claim(session, queued.id, "w1", settings).reason == "cancelled"
        with pytest.raises(DomainError) as err:
            jobs.request_cancel(session, None, queued.id)
        assert (status_of(err.value), err.value.code) == (409, "job_finished")

        assert job_runs.claim(session, running.id, "w1", settings).claimed
        assert job_runs.heartbeat(session, running.id, "w1") == "ok"
        assert jobs.request_cancel(session, None, running.id).status == "cancelling"
        assert jobs.request_cancel(session, None, running.id).status == "cancelling"  # idempotent
        assert job_runs.heartbeat(session, running.id, "w1") == "cancel"
        assert _succeed(session, running.id, "w1") is None  # too late: the cancel wins
        assert job_runs.finish_cancelled(session, running.id, "w1")
        assert session.scalar(sa.select(sa.func.count()).select_from(Model)) == 0
        with pytest.raises(DomainError) as err:
            jobs.request_cancel(session, None, "job_" + "c" * 20)
        assert status_of(err.value) == 404
    assert load(db, running.id).status == "cancelled"


def test_success_writes_the_model_and_the_job_together(db: Database, settings: Settings) -> None:
    job, _ = create(db, add_dataset(db), name="pets v1")
    model_id = new_id("mdl")
    metrics = {"accuracy": 0.75}
    with db.sessionmaker() as session:
        assert job_runs.claim(session, job.id, "w1", settings).claimed
        progress = {"step": 5, "total_steps": 500, "loss": 1.5, "phase": "training"}
        assert job_runs.record_progress(session, job.id, "w1", progress)
        assert load(db, job.id).progress == progress
        model = job_runs.finish_succeeded(
            session,
            job.id,
            "w1",
            TrainedModel(
                model_id,
                f"models/{model_id}",
                ["cat", "dog", "eel"],
                {"crop": 128, "mean": [0.5] * 3, "std": [0.5] * 3},
                metrics,
                4096,
            ),
        )
        assert model is not None
        # A late duplicate delivery finds the job finished.
        assert job_runs.claim(session, job.id, "w2", settings).reason == "succeeded"
        assert not job_runs.finish_failed(session, job.id, "w1", "x", "y")
    row = load(db, job.id)
    assert (row.status, row.model_id, row.metrics) == ("succeeded", model_id, metrics)
    with db.sessionmaker() as session:
        stored = session.get(Model, model_id)
        assert stored is not None
        assert (stored.job_id, stored.name, stored.classes) == (
            job.id,
            "pets v1",
            ["cat", "dog", "eel"],
        )
        assert stored.plan == row.plan
        assert stored.bytes == 4096  # counts against the tenant's max_stored_bytes


def test_finish_failed_records_the_error(db: Database, settings: Settings) -> None:
    job, _ = create(db, add_dataset(db))
    with db.sessionmaker() as session:
        assert job_runs.claim(session, job.id, "w1", settings).claimed
        assert not job_runs.finish_failed(session, job.id, "w2", "training_error", "boom")  # fenced
        assert job_runs.finish_failed(session, job.id, "w1", "checkpoint_missing", "put it there")
    public = JobPublic.from_row(load(db, job.id)).model_dump(mode="json")
    assert public["status"] == "failed"
    assert public["error"] == {"code": "checkpoint_missing", "message": "put it there"}
    assert public["finished_at"] is not None


def test_release_hands_the_job_back_without_counting_the_attempt(
    db: Database, settings: Settings
) -> None:
    dataset_id = add_dataset(db)
    job, _ = create(db, dataset_id)
    cancelled, _ = create(db, dataset_id)
    with db.sessionmaker() as session:
        assert job_runs.claim(session, job.id, "w1", settings).claimed
        assert not job_runs.release(session, job.id, "w2")  # fenced
        assert job_runs.release(session, job.id, "w1")
        row = load(db, job.id)
        assert (row.status, row.attempts, row.worker_id, row.enqueued_at) == (
            "queued",
            0,
            None,
            None,
        )
        assert job_runs.claim(session, job.id, "w3", settings).job.attempts == 1  # type: ignore[union-attr]
        # A job whose cancel was requested is not released: the worker cancels it instead.
        assert job_runs.claim(session, cancelled.id, "w4", settings).claimed
        jobs.request_cancel(session, None, cancelled.id)
        assert not job_runs.release(session, cancelled.id, "w4")
    assert load(db, cancelled.id).status == "cancelling"


def test_reconcile_repairs_lost_messages_and_silent_workers(
    db: Database, settings: Settings
) -> None:
    dataset_id = add_dataset(db)
    t0 = utcnow()
    ids = {
        name: create(db, dataset_id)[0].id
        for name in ("fresh", "old", "r1", "r2", "dead", "cx", "ok")
    }
    with db.sessionmaker() as session:
        session.execute(  # "old" was sent long ago: Redis may have lost it
            sa.update(Job).where(Job.id == ids["old"]).values(enqueued_at=t0 - timedelta(hours=1))
        )
        session.execute(sa.update(Job).where(Job.id != ids["old"]).values(enqueued_at=t0))
        session.commit()
        for name in ("r1", "r2", "dead", "cx", "ok"):
            assert job_runs.claim(session, ids[name], f"w-{name}", settings, now=t0).claimed
        session.execute(sa.update(Job).where(Job.id == ids["dead"]).values(attempts=2))
        session.commit()
        jobs.request_cancel(session, None, ids["cx"])
        later = t0 + timedelta(seconds=settings.job_stale_after_seconds + 5)
        assert job_runs.heartbeat(session, ids["ok"], "w-ok", now=later) == "ok"
        sent: list[str] = []
        report = job_runs.reconcile(session, settings, sent.append, now=later)
        assert sorted(report.requeued) == sorted([ids["r1"], ids["r2"]])
        assert report.resent == [ids["old"]]
        assert report.failed == [ids["dead"]]
        assert report.cancelled == [ids["cx"]]
        assert sorted(sent) == sorted([ids["r1"], ids["r2"], ids["old"]])
        # A second pass right after finds nothing to do.
        assert not job_runs.reconcile(session, settings, sent.append, now=later)
    states = {name: load(db, job_id) for name, job_id in ids.items()}
    assert {n: j.status for n, j in states.items()} == {
        "fresh": "queued",
        "old": "queued",
        "r1": "queued",
        "r2": "queued",
        "dead": "failed",
        "cx": "cancelled",
        "ok": "running",
    }
    assert states["dead"].error_code == "worker_lost"
    assert states["r1"].worker_id is None and states["r1"].attempts == 1
    assert states["r1"].enqueued_at == later
    with db.sessionmaker() as session:  # the re-queued job is claimed again: attempt 2
        again = job_runs.claim(session, ids["r1"], "w-new", settings, now=later)
        assert again.claimed and again.job is not None and again.job.attempts == 2


def test_progress_writes_are_throttled() -> None:
    clock = [0.0]
    written: list[int] = []
    throttle = Throttled(lambda p: written.append(p.step), 1.0, clock=lambda: clock[0])
    for step in range(1, 11):
        clock[0] = step * 0.25
        throttle(Progress(step=step, total_steps=10, phase="training"))
    # first report, then once per second of clock (steps 5 and 9 at t=1.25, 2.25), and the end
    assert written == [1, 5, 9, 10]
    throttle(Progress(step=10, total_steps=10, phase="evaluating"))
    assert written[-1] == 10 and len(written) == 5  # a new phase is always written


def test_checkpoint_interval() -> None:
    assert [checkpoint_every(n) for n in (1, 9, 40, 500, 10_000)] == [1, 1, 4, 50, 50]


def _succeed(session: Session, job_id: str, worker_id: str) -> Model | None:
    """finish_succeeded with a throwaway model, for the cases where it must be refused."""
    return job_runs.finish_succeeded(
        session,
        job_id,
        worker_id,
        TrainedModel(new_id("mdl"), "models/x", ["a"], {}, {}, 0),
    )
