"""A batch prediction's run in the database: claimed, beating, shard by shard, ended, repaired.

The rules of evaluations (service.evaluation_runs): the row is the truth and a `batch_predict`
message only names the row, so a lost or duplicated message is harmless. A worker takes a
queued batch prediction with a compare-and-set `claim` (attempts + 1), beats while it works
(`heartbeat`), records each shard it has published (`record_shards`, which also answers
whether a cancel was asked for) and ends it with `finish_*`, each fenced on its worker id.
A cancel of a running one makes it `cancelling` (service.batch_predictions); its worker stops
between shards and ends it `cancelled`. `reconcile` (every worker's reconcile loop) sends what
was never sent, gives the batch predictions of dead workers back to the queue (their
published shards are kept: the next worker skips them), fails them after `job_max_attempts`,
and ends `cancelled` those left cancelling by a dead worker. One whose dataset is still being
ingested waits: `claim` answers "waiting" and the ingest worker sends it again once the
dataset is ready (`send_waiting`), or fails it with the dataset's error (`fail_waiting`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import held_rows
from service.ids import utcnow
from service.settings import Settings
from service.tables import BatchPrediction, Dataset

log = logging.getLogger(__name__)

QUEUED, RUNNING, CANCELLING = "queued", "running", "cancelling"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
Send = held_rows.Send


@dataclass
class BatchPredictionRepairs:
    resent: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    send_failed: bool = False

    def __bool__(self) -> bool:
        return bool(self.resent or self.requeued or self.failed or self.cancelled)


def claim(session: Session, batch_id: str, worker_id: str, settings: Settings) -> str:
    """Take a queued batch prediction (or a running one whose worker stopped beating):
    "claimed", or why not: "not_found", "succeeded", "failed", "cancelled", "cancelling",
    "held", "waiting" (its dataset is still being ingested) or "too_many_attempts" (then it
    is failed here). The shard counts are kept: they describe shards already published."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.job_stale_after_seconds)
    row = session.get(BatchPrediction, batch_id, populate_existing=True)
    if row is None:
        return "not_found"
    if row.dataset_id is not None:
        dataset = session.get(Dataset, row.dataset_id, populate_existing=True)
        if dataset is not None and dataset.status == "processing":
            return "waiting"
    takeable = sa.and_(BatchPrediction.id == batch_id, held_rows.takeable(BatchPrediction, stale))
    taken = _update(
        session,
        [takeable, BatchPrediction.attempts < settings.job_max_attempts],
        {
            "status": RUNNING,
            "worker_id": worker_id,
            "heartbeat_at": now,
            "started_at": sa.func.coalesce(BatchPrediction.started_at, now),
            "attempts": BatchPrediction.attempts + 1,
        },
    )
    if taken:
        return "claimed"
    session.refresh(row)
    if row.status in (*FINISHED, CANCELLING):
        return row.status
    if row.status == RUNNING and row.heartbeat_at is not None and row.heartbeat_at >= stale:
        return "held"
    message = (
        f"the batch prediction was started {row.attempts} times (limit "
        f"{settings.job_max_attempts}) without finishing; its last worker probably crashed. "
        "Ask for it again."
    )
    _update(session, [takeable], _failed_values("batch_prediction_failed", message, now))
    return "too_many_attempts"


def heartbeat(session: Session, batch_id: str, worker_id: str) -> bool:
    """Beat; False when the batch prediction is no longer this worker's."""
    return _update(session, [_owned(batch_id, worker_id)], {"heartbeat_at": utcnow()})


def record_shards(
    session: Session,
    batch_id: str,
    worker_id: str,
    *,
    shards_done: int,
    shards_total: int,
    images_done: int,
    images_total: int,
) -> str:
    """Store the counts of the shards published so far: "ok", "cancel" (a cancel was asked
    for: stop now) or "lost" (no longer this worker's)."""
    values = {
        "shards_done": shards_done,
        "shards_total": shards_total,
        "images_done": images_done,
        "images_total": images_total,
        "heartbeat_at": utcnow(),
    }
    if not _update(session, [_owned(batch_id, worker_id)], values):
        return "lost"
    cancel = session.scalar(
        sa.select(BatchPrediction.cancel_requested).where(BatchPrediction.id == batch_id)
    )
    return "cancel" if cancel else "ok"


def finish_succeeded(
    session: Session, batch_id: str, worker_id: str, result: Mapping[str, Any]
) -> bool:
    """running -> succeeded (a cancel that came too late loses: the output is there)."""
    values = {
        "status": SUCCEEDED,
        "result": dict(result),
        "finished_at": utcnow(),
        "worker_id": None,
    }
    return _update(session, [_owned(batch_id, worker_id)], values)


def finish_cancelled(session: Session, batch_id: str, worker_id: str) -> bool:
    values = {"status": CANCELLED, "finished_at": utcnow(), "worker_id": None}
    return _update(session, [_owned(batch_id, worker_id)], values)


def finish_failed(session: Session, batch_id: str, worker_id: str, code: str, message: str) -> bool:
    """running -> failed; False when it is no longer ours."""
    values = _failed_values(code, message, utcnow())
    return _update(session, [_owned(batch_id, worker_id)], values)


def mark_sent(session: Session, batch_id: str) -> None:
    held_rows.mark_sent(session, BatchPrediction, batch_id, utcnow())


def send_waiting(session: Session, dataset_id: str, send: Send) -> list[str]:
    """The dataset is ready: send the batch predictions that waited for it."""
    return held_rows.send_waiting(session, BatchPrediction, dataset_id, send, utcnow())


def fail_waiting(session: Session, dataset_id: str, code: str, message: str) -> list[str]:
    """The dataset failed ingestion: so do the batch predictions that waited for it."""
    return held_rows.fail_waiting(
        session, BatchPrediction, dataset_id, code, message, _failed_values, utcnow()
    )


def reconcile(
    session: Session, settings: Settings, send: Send, now: datetime | None = None
) -> BatchPredictionRepairs:
    """Repair what the broker or a dead worker lost (compare-and-set: several workers may run
    it at once; a duplicate message is refused by `claim`)."""
    now = now or utcnow()
    report = BatchPredictionRepairs()
    stale = now - timedelta(seconds=settings.job_stale_after_seconds)
    dead = session.execute(
        sa.select(BatchPrediction.id, BatchPrediction.status, BatchPrediction.attempts).where(
            BatchPrediction.status.in_((RUNNING, CANCELLING)), _stale(stale)
        )
    ).all()
    for batch_id, status, attempts in dead:
        fence = [BatchPrediction.id == batch_id, BatchPrediction.status == status, _stale(stale)]
        if status == CANCELLING:  # its worker died before it could stop: nothing to resume
            values = {"status": CANCELLED, "finished_at": now, "worker_id": None}
            if _update(session, fence, values):
                report.cancelled.append(batch_id)
        elif attempts >= settings.job_max_attempts:
            message = (
                f"the worker running it stopped answering on attempt {attempts} of "
                f"{settings.job_max_attempts}. Ask for the batch prediction again."
            )
            if _update(session, fence, _failed_values("batch_prediction_failed", message, now)):
                report.failed.append(batch_id)
        elif _update(session, fence, {"status": QUEUED, "worker_id": None, "heartbeat_at": None}):
            report.requeued.append(batch_id)
    report.send_failed = held_rows.resend_unsent(
        session, BatchPrediction, settings, send, now, report.requeued, report.resent
    )
    return report


def _failed_values(code: str, message: str, now: datetime) -> dict[str, Any]:
    return {
        "status": FAILED,
        "error_code": code,
        "error_message": message,
        "finished_at": now,
        "worker_id": None,
    }


def _stale(before: datetime) -> sa.ColumnElement[bool]:
    return held_rows.stale(BatchPrediction, before)


def _owned(batch_id: str, worker_id: str) -> sa.ColumnElement[bool]:
    """Still this worker's: running, or cancelling (it is about to stop)."""
    return held_rows.owned(BatchPrediction, batch_id, worker_id, (RUNNING, CANCELLING))


def _update(
    session: Session, conditions: list[sa.ColumnElement[bool]], values: Mapping[str, Any]
) -> bool:
    return held_rows.update(session, BatchPrediction, conditions, values)
