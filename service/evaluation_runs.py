"""An evaluation's run in the database: claimed, beating, succeeded or failed, and repaired.

The rules of dataset ingestion (service.ingest_runs): the row is the truth and an `evaluate`
message only names the row, so a lost or duplicated message is harmless. A worker takes a
queued evaluation with a compare-and-set `claim` (attempts + 1), beats while it scores
(`heartbeat`, which also stores the progress) and ends it with `finish_*`, each fenced on its
worker id. `reconcile` (every worker's reconcile loop) sends what was never sent, gives the
evaluations of dead workers back to the queue and fails them after `job_max_attempts`.
An evaluation whose dataset is still being ingested waits: `claim` answers "waiting" and the
ingest worker sends it again once the dataset is ready (`send_waiting`), or fails it with the
dataset's error (`fail_waiting`).
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
from service.tables import Dataset, Evaluation

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
Send = held_rows.Send


@dataclass
class EvaluationRepairs:
    resent: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    send_failed: bool = False

    def __bool__(self) -> bool:
        return bool(self.resent or self.requeued or self.failed)


def claim(session: Session, evaluation_id: str, worker_id: str, settings: Settings) -> str:
    """Take a queued evaluation (or a running one whose worker stopped beating): "claimed", or
    why not: "not_found", "succeeded", "failed", "held", "waiting" (its dataset is still
    being ingested) or "too_many_attempts" (then it is failed here)."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.job_stale_after_seconds)
    row = session.get(Evaluation, evaluation_id, populate_existing=True)
    if row is None:
        return "not_found"
    if row.dataset_id is not None:
        dataset = session.get(Dataset, row.dataset_id, populate_existing=True)
        if dataset is not None and dataset.status == "processing":
            return "waiting"
    takeable = sa.and_(Evaluation.id == evaluation_id, held_rows.takeable(Evaluation, stale))
    taken = _update(
        session,
        [takeable, Evaluation.attempts < settings.job_max_attempts],
        {
            "status": RUNNING,
            "worker_id": worker_id,
            "heartbeat_at": now,
            "started_at": sa.func.coalesce(Evaluation.started_at, now),
            "attempts": Evaluation.attempts + 1,
            "progress": {"done": 0, "total": None},
        },
    )
    if taken:
        return "claimed"
    session.refresh(row)
    if row.status in (SUCCEEDED, FAILED):
        return row.status
    if row.status == RUNNING and row.heartbeat_at is not None and row.heartbeat_at >= stale:
        return "held"
    message = (
        f"the evaluation was started {row.attempts} times (limit {settings.job_max_attempts}) "
        "without finishing; its last worker probably crashed. Ask for it again."
    )
    _update(session, [takeable], _failed_values("evaluation_failed", message, now))
    return "too_many_attempts"


def heartbeat(
    session: Session, evaluation_id: str, worker_id: str, progress: Mapping[str, Any]
) -> bool:
    """Beat and store the progress; False when the evaluation is no longer this worker's."""
    values = {"heartbeat_at": utcnow(), "progress": dict(progress)}
    return _update(session, [_owned(evaluation_id, worker_id)], values)


def finish_succeeded(
    session: Session, evaluation_id: str, worker_id: str, result: Mapping[str, Any]
) -> bool:
    values = {
        "status": SUCCEEDED,
        "result": dict(result),
        "progress": None,
        "finished_at": utcnow(),
        "worker_id": None,
    }
    return _update(session, [_owned(evaluation_id, worker_id)], values)


def finish_failed(
    session: Session, evaluation_id: str, worker_id: str, code: str, message: str
) -> bool:
    """running -> failed; False when it is no longer ours."""
    values = _failed_values(code, message, utcnow())
    return _update(session, [_owned(evaluation_id, worker_id)], values)


def mark_sent(session: Session, evaluation_id: str) -> None:
    held_rows.mark_sent(session, Evaluation, evaluation_id, utcnow())


def send_waiting(session: Session, dataset_id: str, send: Send) -> list[str]:
    """The dataset is ready: send the evaluations that waited for it."""
    return held_rows.send_waiting(session, Evaluation, dataset_id, send, utcnow())


def fail_waiting(session: Session, dataset_id: str, code: str, message: str) -> list[str]:
    """The dataset failed ingestion: so do the evaluations that waited for it."""
    return held_rows.fail_waiting(
        session, Evaluation, dataset_id, code, message, _failed_values, utcnow()
    )


def reconcile(
    session: Session, settings: Settings, send: Send, now: datetime | None = None
) -> EvaluationRepairs:
    """Repair what the broker or a dead worker lost (compare-and-set: several workers may run
    it at once; a duplicate message is refused by `claim`)."""
    now = now or utcnow()
    report = EvaluationRepairs()
    stale = now - timedelta(seconds=settings.job_stale_after_seconds)
    dead = session.execute(
        sa.select(Evaluation.id, Evaluation.attempts).where(
            Evaluation.status == RUNNING, held_rows.stale(Evaluation, stale)
        )
    ).all()
    for evaluation_id, attempts in dead:
        fence = [
            Evaluation.id == evaluation_id,
            Evaluation.status == RUNNING,
            held_rows.stale(Evaluation, stale),
        ]
        if attempts >= settings.job_max_attempts:
            message = (
                f"the worker scoring it stopped answering on attempt {attempts} of "
                f"{settings.job_max_attempts}. Ask for the evaluation again."
            )
            if _update(session, fence, _failed_values("evaluation_failed", message, now)):
                report.failed.append(evaluation_id)
        elif _update(session, fence, {"status": QUEUED, "worker_id": None, "heartbeat_at": None}):
            report.requeued.append(evaluation_id)
    report.send_failed = held_rows.resend_unsent(
        session, Evaluation, settings, send, now, report.requeued, report.resent
    )
    return report


def _failed_values(code: str, message: str, now: datetime) -> dict[str, Any]:
    return {
        "status": FAILED,
        "error_code": code,
        "error_message": message,
        "progress": None,
        "finished_at": now,
        "worker_id": None,
    }


def _owned(evaluation_id: str, worker_id: str) -> sa.ColumnElement[bool]:
    return held_rows.owned(Evaluation, evaluation_id, worker_id)


def _update(
    session: Session, conditions: list[sa.ColumnElement[bool]], values: Mapping[str, Any]
) -> bool:
    return held_rows.update(session, Evaluation, conditions, values)
