"""An evaluation's run in the database (service.evaluation_runs, with service.held_rows): the
claim and its refusals, the heartbeat, a stale worker taken over, the finishes fenced on the
worker id, the wait for a dataset being ingested, and the reconciler's resending, requeueing and
failing. On real SQLite and PostgreSQL databases (tests/unit/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from service import evaluation_runs as runs
from service import evaluations, held_rows
from service.db import Database
from service.ids import utcnow
from service.settings import Settings
from service.tables import Dataset, Evaluation
from tests.unit.job_helpers import add_dataset, add_model

STARTED = {"done": 0, "total": None}


@pytest.fixture
def clean(db: Database) -> Iterator[Database]:
    # The reconciler reads every queued evaluation: start each test without any (SQLite does
    # not cascade the conftest's model delete to them).
    with db.sessionmaker() as session:
        session.execute(sa.delete(Evaluation))
        session.commit()
    yield db


def create(db: Database, dataset_id: str | None = None, sent: list[str] | None = None) -> str:
    dataset_id = dataset_id or add_dataset(db)
    outbox = sent if sent is not None else []
    with db.sessionmaker() as session:
        row = evaluations.create_evaluation(session, None, add_model(db), dataset_id, outbox.append)
    return row.id


def load(db: Database, evaluation_id: str) -> Evaluation:
    with db.sessionmaker() as session:
        row = session.get(Evaluation, evaluation_id)
    assert row is not None
    return row


def set_fields(db: Database, evaluation_id: str, **values: object) -> None:
    with db.sessionmaker() as session:
        session.execute(sa.update(Evaluation).where(Evaluation.id == evaluation_id).values(values))
        session.commit()


def claim(db: Database, evaluation_id: str, worker_id: str, settings: Settings) -> str:
    with db.sessionmaker() as session:
        return runs.claim(session, evaluation_id, worker_id, settings)


def stale_time(settings: Settings) -> datetime:
    return utcnow() - timedelta(seconds=settings.job_stale_after_seconds + 1)


def test_the_claim_takes_a_queued_evaluation_once(clean: Database, settings: Settings) -> None:
    sent: list[str] = []
    evaluation_id = create(clean, sent=sent)
    queued = load(clean, evaluation_id)
    assert sent == [evaluation_id]
    assert (queued.status, queued.worker_id, queued.attempts, queued.progress) == (
        "queued",
        None,
        0,
        None,
    )
    assert queued.sent_at is not None and queued.started_at is None
    before = utcnow()
    assert claim(clean, evaluation_id, "w1", settings) == "claimed"
    after = utcnow()
    row = load(clean, evaluation_id)
    assert (row.status, row.worker_id, row.attempts, row.progress) == ("running", "w1", 1, STARTED)
    assert row.heartbeat_at is not None and before <= row.heartbeat_at <= after
    assert row.started_at == row.heartbeat_at
    # Held by a beating worker: nobody else takes it, and no attempt is counted.
    assert claim(clean, evaluation_id, "w2", settings) == "held"
    assert claim(clean, evaluation_id, "w1", settings) == "held"  # a duplicate message
    assert (load(clean, evaluation_id).worker_id, load(clean, evaluation_id).attempts) == ("w1", 1)
    assert claim(clean, "eval_" + "z" * 20, "w1", settings) == "not_found"


def test_the_heartbeat_stores_the_progress_only_for_its_worker(
    clean: Database, settings: Settings
) -> None:
    evaluation_id = create(clean)
    assert claim(clean, evaluation_id, "w1", settings) == "claimed"
    first = load(clean, evaluation_id).heartbeat_at
    assert first is not None
    with clean.sessionmaker() as session:
        assert runs.heartbeat(session, evaluation_id, "w1", {"done": 40, "total": 120})
    beaten = load(clean, evaluation_id)
    assert beaten.progress == {"done": 40, "total": 120}
    assert beaten.heartbeat_at is not None and beaten.heartbeat_at >= first
    with clean.sessionmaker() as session:
        assert not runs.heartbeat(session, evaluation_id, "w2", {"done": 99, "total": 120})
        assert not runs.heartbeat(session, "eval_" + "z" * 20, "w1", {"done": 1, "total": 1})
    unchanged = load(clean, evaluation_id)
    assert (unchanged.progress, unchanged.heartbeat_at) == (
        {"done": 40, "total": 120},
        beaten.heartbeat_at,
    )


def test_a_stale_worker_is_taken_over_and_fenced_out(clean: Database, settings: Settings) -> None:
    evaluation_id = create(clean)
    assert claim(clean, evaluation_id, "w1", settings) == "claimed"
    started = load(clean, evaluation_id).started_at
    with clean.sessionmaker() as session:
        assert runs.heartbeat(session, evaluation_id, "w1", {"done": 7, "total": 9})
    # One second short of the stale limit it is still w1's; one past, w2 takes it over.
    almost = utcnow() - timedelta(seconds=settings.job_stale_after_seconds - 1)
    set_fields(clean, evaluation_id, heartbeat_at=almost)
    assert claim(clean, evaluation_id, "w2", settings) == "held"
    set_fields(clean, evaluation_id, heartbeat_at=stale_time(settings))
    assert claim(clean, evaluation_id, "w2", settings) == "claimed"
    taken = load(clean, evaluation_id)
    assert (taken.status, taken.worker_id, taken.attempts, taken.progress) == (
        "running",
        "w2",
        2,
        STARTED,  # scoring starts over
    )
    assert taken.started_at == started  # the first start is kept
    with clean.sessionmaker() as session:
        assert not runs.heartbeat(session, evaluation_id, "w1", {"done": 9, "total": 9})
        assert not runs.finish_succeeded(session, evaluation_id, "w1", {"accuracy": 1.0})
        assert not runs.finish_failed(session, evaluation_id, "w1", "evaluation_error", "x")
    still = load(clean, evaluation_id)
    assert (still.status, still.worker_id, still.progress, still.result, still.error_code) == (
        "running",
        "w2",
        STARTED,
        None,
        None,
    )
    # A running row with no heartbeat at all is as stale as an old one.
    set_fields(clean, evaluation_id, heartbeat_at=None)
    assert claim(clean, evaluation_id, "w3", settings) == "too_many_attempts"  # limit is 2


def test_succeeded_is_recorded_once_by_its_worker(clean: Database, settings: Settings) -> None:
    evaluation_id = create(clean)
    assert claim(clean, evaluation_id, "w1", settings) == "claimed"
    result = {"accuracy": 0.75, "num_examples": 12, "classes": ["cat", "dog", "eel"]}
    before = utcnow()
    with clean.sessionmaker() as session:
        assert runs.finish_succeeded(session, evaluation_id, "w1", result)
        # Ended: neither its worker again nor a failure can change it.
        assert not runs.finish_succeeded(session, evaluation_id, "w1", {"accuracy": 0.0})
        assert not runs.finish_failed(session, evaluation_id, "w1", "evaluation_error", "late")
        assert not runs.heartbeat(session, evaluation_id, "w1", {"done": 1, "total": 1})
    row = load(clean, evaluation_id)
    assert (row.status, row.result, row.progress, row.worker_id, row.error_code) == (
        "succeeded",
        result,
        None,
        None,
        None,
    )
    assert row.finished_at is not None and row.finished_at >= before
    assert claim(clean, evaluation_id, "w2", settings) == "succeeded"
    assert load(clean, evaluation_id).attempts == 1


def test_failed_is_recorded_once_by_its_worker(clean: Database, settings: Settings) -> None:
    evaluation_id = create(clean)
    assert claim(clean, evaluation_id, "w1", settings) == "claimed"
    with clean.sessionmaker() as session:
        assert not runs.finish_failed(session, evaluation_id, "w2", "unknown_labels", "not w2's")
        assert runs.finish_failed(session, evaluation_id, "w1", "unknown_labels", "bee, wasp")
        assert not runs.finish_succeeded(session, evaluation_id, "w1", {"accuracy": 1.0})
    row = load(clean, evaluation_id)
    assert (row.status, row.error_code, row.error_message, row.worker_id, row.progress) == (
        "failed",
        "unknown_labels",
        "bee, wasp",
        None,
        None,
    )
    assert row.result is None and row.finished_at is not None
    assert claim(clean, evaluation_id, "w2", settings) == "failed"


def test_past_the_attempt_limit_the_claim_fails_it(clean: Database, settings: Settings) -> None:
    evaluation_id = create(clean)
    for attempt in range(settings.job_max_attempts):
        assert claim(clean, evaluation_id, f"w{attempt}", settings) == "claimed"
        if attempt < settings.job_max_attempts - 1:
            set_fields(clean, evaluation_id, heartbeat_at=stale_time(settings))
    # At the limit but still beating: held, not failed.
    assert claim(clean, evaluation_id, "late", settings) == "held"
    assert load(clean, evaluation_id).status == "running"
    set_fields(clean, evaluation_id, heartbeat_at=stale_time(settings))
    assert claim(clean, evaluation_id, "late", settings) == "too_many_attempts"
    row = load(clean, evaluation_id)
    assert (row.status, row.error_code, row.worker_id, row.attempts, row.progress) == (
        "failed",
        "evaluation_failed",
        None,
        2,
        None,
    )
    assert row.error_message == (
        "the evaluation was started 2 times (limit 2) without finishing; its last worker "
        "probably crashed. Ask for it again."
    )
    assert claim(clean, evaluation_id, "later", settings) == "failed"


def test_an_evaluation_waits_for_its_dataset_then_is_sent(
    clean: Database, settings: Settings
) -> None:
    dataset_id = add_dataset(clean, status="processing")
    sent: list[str] = []
    first, second = create(clean, dataset_id, sent), create(clean, dataset_id, sent)
    assert sent == []  # not sent while the dataset is being ingested
    assert claim(clean, first, "w1", settings) == "waiting"
    row = load(clean, first)
    assert (row.status, row.attempts, row.worker_id, row.sent_at) == ("queued", 0, None, None)

    def broken(_: str) -> None:
        raise ConnectionError("broker down")

    with clean.sessionmaker() as session:
        assert runs.send_waiting(session, add_dataset(clean), sent.append) == []
        # A failed send leaves them unsent, for the reconciler.
        assert runs.send_waiting(session, dataset_id, broken) == []
    assert (load(clean, first).sent_at, load(clean, second).sent_at) == (None, None)
    set_fields(clean, second, status="failed")  # e.g. ended meanwhile: not sent again
    now = utcnow()
    with clean.sessionmaker() as session:
        assert held_rows.send_waiting(session, Evaluation, dataset_id, sent.append, now) == [first]
    assert sent == [first]
    assert (load(clean, first).sent_at, load(clean, second).sent_at) == (now, None)
    with clean.sessionmaker() as session:
        session.execute(sa.update(Dataset).where(Dataset.id == dataset_id).values(status="ready"))
        session.commit()
    assert claim(clean, first, "w1", settings) == "claimed"


def test_a_failed_ingestion_fails_the_queued_evaluations_that_waited(clean: Database) -> None:
    dataset_id = add_dataset(clean, status="processing")
    waiting = {create(clean, dataset_id), create(clean, dataset_id)}
    running = create(clean, dataset_id)
    set_fields(clean, running, status="running", worker_id="w1")
    elsewhere = create(clean, add_dataset(clean, status="processing"))
    with clean.sessionmaker() as session:
        failed = runs.fail_waiting(session, dataset_id, "too_few_images", "2 images, 5 needed")
        assert runs.fail_waiting(session, dataset_id, "too_few_images", "again") == []
    assert sorted(failed) == sorted(waiting)
    for evaluation_id in waiting:
        row = load(clean, evaluation_id)
        assert (row.status, row.error_code, row.worker_id, row.progress) == (
            "failed",
            "dataset_failed",
            None,
            None,
        )
        assert row.error_message == (
            f"the dataset {dataset_id} could not be ingested: too_few_images: 2 images, 5 needed"
        )
        assert row.finished_at is not None
    assert (load(clean, running).status, load(clean, running).worker_id) == ("running", "w1")
    assert load(clean, elsewhere).status == "queued"


def test_the_reconciler_resends_requeues_and_fails(clean: Database, settings: Settings) -> None:
    now = utcnow()
    later = now + timedelta(seconds=held_rows.SEND_GRACE_SECONDS + 1)
    never_sent = create(clean)  # its send was lost: sent_at never written
    set_fields(clean, never_sent, sent_at=None)
    sent_long_ago = create(clean)
    set_fields(
        clean,
        sent_long_ago,
        sent_at=later - timedelta(seconds=settings.job_resend_after_seconds + 1),
    )
    sent_recently = create(clean)
    set_fields(clean, sent_recently, sent_at=now)
    dead, spent, alive = create(clean), create(clean), create(clean)
    for evaluation_id in (dead, spent, alive):
        assert claim(clean, evaluation_id, "gone", settings) == "claimed"
    stale = later - timedelta(seconds=settings.job_stale_after_seconds + 1)
    set_fields(clean, dead, heartbeat_at=stale)
    set_fields(clean, spent, heartbeat_at=stale, attempts=2)
    set_fields(clean, alive, heartbeat_at=later)
    sent: list[str] = []
    with clean.sessionmaker() as session:
        report = runs.reconcile(session, settings, sent.append, now=later)
    assert report.requeued == [dead] and report.failed == [spent]
    assert sorted(report.resent) == sorted([never_sent, sent_long_ago])
    assert sorted(sent) == sorted([never_sent, sent_long_ago, dead])
    assert report.send_failed is False and bool(report)
    requeued = load(clean, dead)
    assert (requeued.status, requeued.worker_id, requeued.heartbeat_at, requeued.sent_at) == (
        "queued",
        None,
        None,
        later,
    )
    assert requeued.attempts == 1  # counted by the next claim
    failed = load(clean, spent)
    assert (failed.status, failed.error_code, failed.worker_id, failed.finished_at) == (
        "failed",
        "evaluation_failed",
        None,
        later,
    )
    assert failed.error_message == (
        "the worker scoring it stopped answering on attempt 2 of 2. Ask for the evaluation again."
    )
    assert (load(clean, alive).status, load(clean, alive).worker_id) == ("running", "gone")
    assert load(clean, sent_recently).sent_at == now
    for evaluation_id in (never_sent, sent_long_ago):
        assert load(clean, evaluation_id).sent_at == later
    # A second pass at the same moment finds nothing left to do.
    with clean.sessionmaker() as session:
        again = runs.reconcile(session, settings, sent.append, now=later)
    assert (again.resent, again.requeued, again.failed, bool(again)) == ([], [], [], False)


def test_a_fresh_unsent_evaluation_is_left_to_its_request(
    clean: Database, settings: Settings
) -> None:
    evaluation_id = create(clean)
    set_fields(clean, evaluation_id, sent_at=None)  # the request may be sending it right now
    sent: list[str] = []
    with clean.sessionmaker() as session:
        report = runs.reconcile(session, settings, sent.append)
    assert (sent, report.resent, bool(report)) == ([], [], False)
    assert load(clean, evaluation_id).sent_at is None


def test_a_failed_resend_is_undone_and_stops_the_pass(clean: Database, settings: Settings) -> None:
    first, second = create(clean), create(clean)
    later = utcnow() + timedelta(seconds=held_rows.SEND_GRACE_SECONDS + 1)
    for evaluation_id in (first, second):
        set_fields(clean, evaluation_id, sent_at=None)
    tried: list[str] = []

    def broken(evaluation_id: str) -> None:
        tried.append(evaluation_id)
        raise ConnectionError("broker down")

    with clean.sessionmaker() as session:
        report = runs.reconcile(session, settings, broken, now=later)
    assert report.send_failed is True and report.resent == []
    assert tried == [first]  # oldest first; the broker is down: the pass stops there
    assert (load(clean, first).sent_at, load(clean, second).sent_at) == (None, None)
    sent: list[str] = []
    with clean.sessionmaker() as session:
        report = runs.reconcile(session, settings, sent.append, now=later)
    assert report.send_failed is False
    assert sent == report.resent == [first, second]  # oldest first
