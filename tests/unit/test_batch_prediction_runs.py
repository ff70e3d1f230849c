"""Batch predictions in the database (service.batch_predictions, service.batch_prediction_runs):
creation, claim, fencing, the shard counts and cancel, the reconciler's repairs, a dataset
still being ingested; and the output's rows (worker.batch_predict). On real SQLite and
PostgreSQL databases."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest

from service import batch_prediction_runs as runs
from service import batch_predictions, held_rows
from service.db import Database
from service.domain_errors import Conflict, NotFound
from service.ids import utcnow
from service.settings import Settings
from service.tables import BatchPrediction
from tests.unit.job_helpers import add_dataset, add_model
from worker.batch_predict import Row, count_rows, header, render


def create(
    db: Database, dataset_status: str = "ready", sent: list[str] | None = None
) -> BatchPrediction:
    dataset_id = add_dataset(db, status=dataset_status)
    with db.sessionmaker() as session:
        return batch_predictions.create_batch_prediction(
            session,
            None,
            add_model(db),
            dataset_id,
            3,
            "csv",
            (sent if sent is not None else []).append,
        )


def load(db: Database, batch_id: str) -> BatchPrediction:
    with db.sessionmaker() as session:
        row = session.get(BatchPrediction, batch_id)
    assert row is not None
    return row


def record(db: Database, batch_id: str, worker_id: str, done: int) -> str:
    with db.sessionmaker() as session:
        return runs.record_shards(
            session,
            batch_id,
            worker_id,
            shards_done=done,
            shards_total=5,
            images_done=2 * done,
            images_total=10,
        )


def test_creation_sends_it_and_a_processing_dataset_makes_it_wait(
    db: Database, settings: Settings
) -> None:
    sent: list[str] = []
    ready = create(db, sent=sent)
    waiting = create(db, dataset_status="processing", sent=sent)
    assert sent == [ready.id]  # the waiting one is sent once its dataset is ready
    assert (ready.status, ready.top_k, ready.format, ready.images_total) == ("queued", 3, "csv", 14)
    assert ready.sent_at is not None and waiting.sent_at is None
    assert waiting.images_total is None
    with db.sessionmaker() as session:
        assert runs.claim(session, waiting.id, "w1", settings) == "waiting"
        assert runs.send_waiting(session, "ds_" + "z" * 20, sent.append) == []
        assert waiting.dataset_id is not None
        assert runs.send_waiting(session, waiting.dataset_id, sent.append) == [waiting.id]
    assert sent == [ready.id, waiting.id]


def test_a_failed_or_unknown_dataset_or_model_is_refused(db: Database) -> None:
    model_id = add_model(db)
    failed = add_dataset(db, status="failed")
    with db.sessionmaker() as session:
        with pytest.raises(Conflict) as not_ready:
            batch_predictions.create_batch_prediction(
                session, None, model_id, failed, 5, "csv", print
            )
        with pytest.raises(NotFound):
            batch_predictions.create_batch_prediction(
                session, None, model_id, "ds_" + "q" * 20, 5, "csv", print
            )
        with pytest.raises(NotFound):  # another tenant's model
            batch_predictions.create_batch_prediction(
                session, "other", model_id, failed, 5, "csv", print
            )
    assert (not_ready.value.code, not_ready.value.details) == (
        "dataset_not_ready",
        {"status": "failed"},
    )


def test_the_claim_is_fenced_and_a_stale_one_is_taken_over(
    db: Database, settings: Settings
) -> None:
    row = create(db)
    with db.sessionmaker() as session:
        assert runs.claim(session, row.id, "w1", settings) == "claimed"
        assert runs.claim(session, row.id, "w2", settings) == "held"
    assert record(db, row.id, "w1", 2) == "ok"
    # w1 stops beating: past the stale limit w2 takes it, the counts of w1's shards kept.
    with db.sessionmaker() as session:
        session.get(BatchPrediction, row.id).heartbeat_at = utcnow() - timedelta(  # type: ignore[union-attr]
            seconds=settings.job_stale_after_seconds + 1
        )
        session.commit()
        assert runs.claim(session, row.id, "w2", settings) == "claimed"
        assert not runs.heartbeat(session, row.id, "w1")
        assert runs.heartbeat(session, row.id, "w2")
    assert record(db, row.id, "w1", 3) == "lost"
    taken = load(db, row.id)
    assert (taken.worker_id, taken.attempts, taken.shards_done, taken.images_done) == (
        "w2",
        2,
        2,
        4,
    )
    with db.sessionmaker() as session:
        assert not runs.finish_succeeded(session, row.id, "w1", {"rows": 1})
        assert runs.finish_succeeded(session, row.id, "w2", {"rows": 10})
        assert runs.claim(session, row.id, "w3", settings) == "succeeded"
    done = load(db, row.id)
    assert (done.status, done.worker_id, done.result) == ("succeeded", None, {"rows": 10})


def test_past_the_attempt_limit_the_claim_fails_it(db: Database, settings: Settings) -> None:
    row = create(db)
    stale = utcnow() - timedelta(seconds=settings.job_stale_after_seconds + 1)
    with db.sessionmaker() as session:
        for attempt in range(settings.job_max_attempts):
            assert runs.claim(session, row.id, f"w{attempt}", settings) == "claimed"
            session.get(BatchPrediction, row.id).heartbeat_at = stale  # type: ignore[union-attr]
            session.commit()
        assert runs.claim(session, row.id, "late", settings) == "too_many_attempts"
    failed = load(db, row.id)
    assert (failed.status, failed.error_code) == ("failed", "batch_prediction_failed")


def test_cancel_queued_at_once_running_between_shards(db: Database, settings: Settings) -> None:
    queued, running = create(db), create(db)
    with db.sessionmaker() as session:
        cancelled = batch_predictions.request_cancel(session, None, queued.id)
        assert (cancelled.status, cancelled.finished_at is not None) == ("cancelled", True)
        assert runs.claim(session, queued.id, "w1", settings) == "cancelled"
        with pytest.raises(Conflict) as again:
            batch_predictions.request_cancel(session, None, queued.id)
        assert runs.claim(session, running.id, "w1", settings) == "claimed"
    assert (again.value.code, again.value.details) == (
        "batch_prediction_finished",
        {"status": "cancelled"},
    )
    assert record(db, running.id, "w1", 1) == "ok"
    with db.sessionmaker() as session:
        assert batch_predictions.request_cancel(session, None, running.id).status == "cancelling"
        assert batch_predictions.request_cancel(session, None, running.id).status == "cancelling"
        assert runs.heartbeat(session, running.id, "w1")  # still its worker's, to stop
    assert record(db, running.id, "w1", 2) == "cancel"
    with db.sessionmaker() as session:
        assert runs.finish_cancelled(session, running.id, "w1")
    assert load(db, running.id).status == "cancelled"


def test_the_output_is_refused_until_it_succeeded(db: Database, settings: Settings) -> None:
    row = create(db)
    with db.sessionmaker() as session:
        with pytest.raises(Conflict) as early:
            batch_predictions.output(session, None, None, row.id)  # type: ignore[arg-type]
        with pytest.raises(NotFound):
            batch_predictions.output(session, None, "other", row.id)  # type: ignore[arg-type]
    assert (early.value.code, early.value.details) == ("not_finished", {"status": "queued"})


def test_the_reconciler_resends_requeues_fails_and_ends_cancels(
    db: Database, settings: Settings
) -> None:
    unsent = create(db, sent=None)
    with db.sessionmaker() as session:  # its send was lost: sent_at never written
        session.get(BatchPrediction, unsent.id).sent_at = None  # type: ignore[union-attr]
        session.commit()
    dead, spent, stopping = create(db), create(db), create(db)
    stale = utcnow() - timedelta(seconds=settings.job_stale_after_seconds + 1)
    with db.sessionmaker() as session:
        for row in (dead, spent, stopping):
            assert runs.claim(session, row.id, "gone", settings) == "claimed"
        batch_predictions.request_cancel(session, None, stopping.id)
        for row_id, attempts in ((dead.id, 1), (spent.id, 2), (stopping.id, 1)):
            stored = session.get(BatchPrediction, row_id)
            assert stored is not None
            stored.heartbeat_at, stored.attempts = stale, attempts
        session.commit()
        sent: list[str] = []
        later = utcnow() + timedelta(seconds=held_rows.SEND_GRACE_SECONDS + 1)
        report = runs.reconcile(session, settings, sent.append, now=later)
    assert report.requeued == [dead.id] and report.failed == [spent.id]
    assert report.cancelled == [stopping.id] and unsent.id in report.resent
    assert dead.id in sent and unsent.id in sent
    assert load(db, dead.id).status == "queued"
    assert (load(db, spent.id).status, load(db, spent.id).error_code) == (
        "failed",
        "batch_prediction_failed",
    )
    assert load(db, stopping.id).status == "cancelled"


def test_a_failed_ingestion_fails_the_waiting_ones(db: Database) -> None:
    waiting = create(db, dataset_status="processing")
    assert waiting.dataset_id is not None
    with db.sessionmaker() as session:
        failed = runs.fail_waiting(session, waiting.dataset_id, "too_few_images", "2 < 5")
    assert failed == [waiting.id]
    row = load(db, waiting.id)
    assert (row.status, row.error_code) == ("failed", "dataset_failed")
    assert row.error_message is not None and "too_few_images: 2 < 5" in row.error_message


ROWS = [
    Row("cat/a,b.png", [("cat", 0.75), ("dog", 0.25)]),
    Row('dog/"quoted"\nnewline.png', [("dog", 0.5), ("cat", 0.5)]),
    Row("eel/broken.png", [], "undecodable"),
]


def test_csv_rows_quote_what_needs_it_and_count_back(tmp_path: Path) -> None:
    data = header("csv", 2) + render(ROWS, "csv", 2)
    parsed = list(csv.reader(io.StringIO(data.decode(), newline="")))
    assert parsed == [
        ["file", "label_1", "score_1", "label_2", "score_2", "error"],
        ["cat/a,b.png", "cat", "0.75", "dog", "0.25", ""],
        ['dog/"quoted"\nnewline.png', "dog", "0.5", "cat", "0.5", ""],
        ["eel/broken.png", "", "", "", "", "undecodable"],
    ]
    path = tmp_path / "predictions.csv"
    path.write_bytes(data)
    assert count_rows(path) == (3, 1)


def test_jsonl_rows_name_the_error_only_where_there_is_one(tmp_path: Path) -> None:
    data = header("jsonl", 2) + render(ROWS, "jsonl", 2)
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert lines == [
        {
            "file": "cat/a,b.png",
            "predictions": [{"label": "cat", "score": 0.75}, {"label": "dog", "score": 0.25}],
        },
        {
            "file": 'dog/"quoted"\nnewline.png',
            "predictions": [{"label": "dog", "score": 0.5}, {"label": "cat", "score": 0.5}],
        },
        {"file": "eel/broken.png", "predictions": [], "error": "undecodable"},
    ]
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(data)
    assert count_rows(path) == (3, 1)
