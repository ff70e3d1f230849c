"""service.ingest_runs against a real PostgreSQL: claim, heartbeat and finish (fenced on the
worker id), and the reconciler's repairs (send what was never sent, give a dead worker's
dataset back to the queue, fail it after job_max_attempts, resend all after a broker loss).

The database is one of this module's own (created and migrated here), so a reconcile pass sees
exactly the rows these tests made: no other test's server or worker repairs them meanwhile.
The broker is an external boundary here: `send` is a recording callable (the real broker path
is covered by tests/chaos/test_ingest_crash.py and tests/chaos/test_broker_loss.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from service import ingest_runs
from service.db import Database, migrate
from service.ids import new_id, utcnow
from service.settings import Settings
from service.tables import Dataset
from tests.services import create_database, drop_database

pytestmark = [pytest.mark.integration]

STALE_S = 30.0
MAX_ATTEMPTS = 2
RESEND_S = 600.0


@pytest.fixture(scope="module")
def db(postgres_admin_url: str) -> Iterator[Database]:
    url, name = create_database(postgres_admin_url)
    migrate(url)
    database = Database(url)
    try:
        yield database
    finally:
        database.dispose()
        drop_database(postgres_admin_url, name)


@pytest.fixture
def settings(db: Database, tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path,
        database_url=db.url,
        job_stale_after_seconds=STALE_S,
        job_max_attempts=MAX_ATTEMPTS,
        job_resend_after_seconds=RESEND_S,
    )


@pytest.fixture(autouse=True)
def empty(db: Database) -> Iterator[None]:
    yield
    with db.sessionmaker() as session:
        session.execute(sa.delete(Dataset))
        session.commit()


class Recorder:
    """The `send` of reconcile: records the ids; raises for those in `fail_on`."""

    def __init__(self, fail_on: frozenset[str] = frozenset()) -> None:
        self.sent: list[str] = []
        self.fail_on = fail_on

    def __call__(self, dataset_id: str) -> None:
        if dataset_id in self.fail_on:
            raise ConnectionError("broker down")
        self.sent.append(dataset_id)


def add(db: Database, **values: Any) -> str:
    """A dataset row as accept_upload records it (processing), with `values` over it."""
    dataset_id = new_id("ds")
    row = {
        "id": dataset_id,
        "tenant_id": "t",
        "name": "n",
        "status": "processing",
        "num_images": 0,
        "num_classes": 0,
        "classes": [],
        "image_size": {},
        "rejected": [],
        "rejected_counts": {},
        "bytes": 10,
        "storage_key": f"datasets/{dataset_id}",
        "ingest": {"kind": "zip", "options": {}},
        "progress": {"phase": "queued"},
        **values,
    }
    with db.sessionmaker() as session:
        session.add(Dataset(**row))
        session.commit()
    return dataset_id


def get(db: Database, dataset_id: str) -> Dataset:
    with db.sessionmaker() as session:
        row = session.get(Dataset, dataset_id)
        assert row is not None
        session.expunge(row)
        return row


def close_to(stamp: datetime | None, expected: datetime, within_s: float = 5.0) -> bool:
    return stamp is not None and abs((stamp - expected).total_seconds()) <= within_s


def test_claim_fresh_then_held(db: Database, settings: Settings) -> None:
    dataset_id = add(db)
    with db.sessionmaker() as session:
        assert ingest_runs.claim(session, dataset_id, "w1", settings) == "claimed"
    row = get(db, dataset_id)
    assert (row.status, row.worker_id, row.attempts) == ("processing", "w1", 1)
    assert row.progress == {"phase": "extracting"}
    assert close_to(row.heartbeat_at, utcnow())
    # A duplicate message, another worker: the live holder keeps it; nothing changes.
    with db.sessionmaker() as session:
        assert ingest_runs.claim(session, dataset_id, "w2", settings) == "held"
    again = get(db, dataset_id)
    assert (again.worker_id, again.attempts, again.heartbeat_at) == ("w1", 1, row.heartbeat_at)


def test_claim_of_ended_or_unknown_datasets(db: Database, settings: Settings) -> None:
    ready, failed = add(db, status="ready"), add(db, status="failed")
    with db.sessionmaker() as session:
        assert ingest_runs.claim(session, ready, "w", settings) == "ready"
        assert ingest_runs.claim(session, failed, "w", settings) == "failed"
        assert ingest_runs.claim(session, new_id("ds"), "w", settings) == "not_found"
    assert (get(db, ready).attempts, get(db, ready).worker_id) == (0, None)
    assert (get(db, failed).attempts, get(db, failed).worker_id) == (0, None)


def test_a_stale_holder_is_taken_over_and_fenced_out(db: Database, settings: Settings) -> None:
    stale = utcnow() - timedelta(seconds=STALE_S + 1)
    dataset_id = add(db, worker_id="w1", heartbeat_at=stale, attempts=1)
    with db.sessionmaker() as session:
        assert ingest_runs.claim(session, dataset_id, "w2", settings) == "claimed"
        row = get(db, dataset_id)
        assert (row.worker_id, row.attempts) == ("w2", 2)
        # The old holder wakes up: every write of its is refused, nothing of it is stored.
        progress = {"phase": "indexing", "done": 9, "total": 10}
        assert not ingest_runs.heartbeat(session, dataset_id, "w1", progress)
        assert not ingest_runs.finish_ready(session, dataset_id, "w1", {"num_images": 99})
        assert not ingest_runs.finish_failed(session, dataset_id, "w1", "x", "y", {})
        assert get(db, dataset_id).progress == {"phase": "extracting"}
        # The new holder beats, with its progress.
        progress = {"phase": "indexing", "done": 3, "total": 10}
        assert ingest_runs.heartbeat(session, dataset_id, "w2", progress)
    row = get(db, dataset_id)
    assert (row.status, row.worker_id, row.attempts, row.num_images) == (
        "processing",
        "w2",
        2,
        0,
    )
    assert row.progress == progress


def test_a_claim_past_the_attempts_fails_the_dataset(db: Database, settings: Settings) -> None:
    stale = utcnow() - timedelta(seconds=STALE_S + 1)
    dataset_id = add(db, worker_id="w1", heartbeat_at=stale, attempts=MAX_ATTEMPTS)
    with db.sessionmaker() as session:
        assert ingest_runs.claim(session, dataset_id, "w3", settings) == "too_many_attempts"
        assert ingest_runs.claim(session, dataset_id, "w4", settings) == "failed"
    row = get(db, dataset_id)
    assert (row.status, row.error_code, row.attempts, row.worker_id) == (
        "failed",
        "ingest_failed",
        MAX_ATTEMPTS,
        None,
    )
    assert row.error_message == (
        f"ingestion was started {MAX_ATTEMPTS} times (limit {MAX_ATTEMPTS}) without finishing; "
        "its last worker probably crashed. Upload the archive again."
    )
    assert row.error_details == {} and row.progress is None
    assert close_to(row.finished_at, utcnow())


def test_finish_ready_and_failed_are_fenced(db: Database, settings: Settings) -> None:
    good, bad = add(db), add(db)
    values = {"num_images": 4, "num_classes": 2, "classes": [{"name": "a", "count": 2}]}
    with db.sessionmaker() as session:
        assert ingest_runs.claim(session, good, "w", settings) == "claimed"
        assert ingest_runs.claim(session, bad, "w", settings) == "claimed"
        assert not ingest_runs.finish_ready(session, good, "other", values)
        assert ingest_runs.finish_ready(session, good, "w", values)
        assert not ingest_runs.finish_ready(session, good, "w", values)  # once only
        assert not ingest_runs.finish_failed(session, good, "w", "x", "y", {})
        details = {"found": 1, "required": 2}
        assert ingest_runs.finish_failed(session, bad, "w", "too_few_images", "few", details)
        assert not ingest_runs.heartbeat(session, bad, "w", {"phase": "storing"})
    ready = get(db, good)
    assert (ready.status, ready.num_images, ready.num_classes, ready.worker_id) == (
        "ready",
        4,
        2,
        None,
    )
    assert ready.progress == {"phase": "done"} and ready.error_code is None
    assert close_to(ready.finished_at, utcnow())
    failed = get(db, bad)
    assert (failed.status, failed.error_code, failed.error_message) == (
        "failed",
        "too_few_images",
        "few",
    )
    assert failed.error_details == {"found": 1, "required": 2}
    assert (failed.progress, failed.worker_id, failed.num_images) == (None, None, 0)


def test_reconcile_sends_the_unsent_after_the_grace(db: Database, settings: Settings) -> None:
    now = utcnow()
    grace = ingest_runs.SEND_GRACE_SECONDS
    young = add(db, created_at=now - timedelta(seconds=grace - 2))
    old = add(db, created_at=now - timedelta(seconds=grace + 2))
    sent = add(db, created_at=now - timedelta(seconds=grace + 2), sent_at=now)
    send = Recorder()
    with db.sessionmaker() as session:
        report = ingest_runs.reconcile(session, settings, send, now)
    assert (send.sent, report.resent, report.requeued, report.failed) == ([old], [old], [], [])
    assert not report.send_failed and bool(report)
    assert get(db, old).sent_at == now
    assert get(db, young).sent_at is None and get(db, sent).sent_at == now
    # The young one once its grace is over; the sent one once resend time has come.
    later = now + timedelta(seconds=4)
    with db.sessionmaker() as session:
        assert ingest_runs.reconcile(session, settings, send, later).resent == [young]
    much_later = later + timedelta(seconds=RESEND_S + 1)
    with db.sessionmaker() as session:
        report = ingest_runs.reconcile(session, settings, send, much_later)
    assert sorted(report.resent) == sorted([old, sent, young])
    assert send.sent == [old, young, *report.resent]


def test_reconcile_requeues_a_dead_workers_dataset(db: Database, settings: Settings) -> None:
    now = utcnow()
    created = now - timedelta(minutes=5)
    stale = now - timedelta(seconds=STALE_S + 1)
    dead = add(db, created_at=created, worker_id="w1", heartbeat_at=stale, attempts=1, sent_at=now)
    live = add(db, created_at=created, worker_id="w2", heartbeat_at=now, attempts=1, sent_at=now)
    exhausted = add(
        db, created_at=created, worker_id="w3", heartbeat_at=stale, attempts=MAX_ATTEMPTS
    )
    send = Recorder()
    with db.sessionmaker() as session:
        report = ingest_runs.reconcile(session, settings, send, now)
    assert (report.requeued, report.resent, report.failed) == ([dead], [], [exhausted])
    assert send.sent == [dead]  # given back and sent at once, not after the grace
    row = get(db, dead)
    assert (row.status, row.worker_id, row.heartbeat_at, row.sent_at, row.attempts) == (
        "processing",
        None,
        None,
        now,
        1,
    )
    assert get(db, live).worker_id == "w2" and get(db, live).sent_at == now
    failed = get(db, exhausted)
    assert (failed.status, failed.error_code, failed.worker_id, failed.progress) == (
        "failed",
        "ingest_failed",
        None,
        None,
    )
    assert failed.error_message == (
        f"the worker ingesting it stopped answering (no heartbeat for {STALE_S:g} s) on "
        f"attempt {MAX_ATTEMPTS} of {MAX_ATTEMPTS}. Upload the archive again."
    )
    assert failed.finished_at == now
    # The requeued dataset's next claim is attempt 2.
    with db.sessionmaker() as session:
        assert ingest_runs.claim(session, dead, "w4", settings) == "claimed"
    assert get(db, dead).attempts == 2


def test_reconcile_resends_everything_unheld_after_a_broker_loss(
    db: Database, settings: Settings
) -> None:
    now = utcnow()
    created = now - timedelta(minutes=1)
    queued = [add(db, created_at=created + timedelta(seconds=i), sent_at=now) for i in range(2)]
    held = add(db, created_at=created, worker_id="w", heartbeat_at=now, attempts=1, sent_at=now)
    send = Recorder()
    with db.sessionmaker() as session:
        assert not ingest_runs.reconcile(session, settings, send, now)  # all were just sent
        report = ingest_runs.reconcile(session, settings, send, now, messages_lost=True)
    assert report.resent == queued and send.sent == queued  # oldest first
    assert get(db, held).worker_id == "w"  # its worker has it; no message needed


def test_a_failed_send_is_retried_by_the_next_pass(db: Database, settings: Settings) -> None:
    now = utcnow()
    created = now - timedelta(minutes=1)
    first = add(db, created_at=created)
    second = add(db, created_at=created + timedelta(seconds=1))
    down = Recorder(fail_on=frozenset({first}))
    with db.sessionmaker() as session:
        report = ingest_runs.reconcile(session, settings, down, now)
    assert report.send_failed and report.resent == [] and down.sent == []  # stopped at once
    assert get(db, first).sent_at is None and get(db, second).sent_at is None
    up = Recorder()
    with db.sessionmaker() as session:
        report = ingest_runs.reconcile(session, settings, up, now)
    assert (report.resent, up.sent, report.send_failed) == ([first, second], [first, second], False)
