"""A dataset's ingestion in the database: claimed, beating, ready or failed, and repaired.

The same rules as training jobs (service.job_runs), smaller: the row is the truth and an
`ingest` message only says which dataset to work on, so a lost or duplicated message is
harmless. A worker takes a processing dataset with a compare-and-set `claim` (attempts + 1),
beats while it works (`heartbeat`, which also stores the progress), and ends it with `finish_*`,
each fenced on its worker id: a worker whose heartbeat went stale and whose dataset another
worker took (or that was deleted meanwhile) finds out and stops. `reconcile` (run by every
worker's reconcile loop) sends what was never sent, and gives the datasets of dead workers back
to the queue, or fails them after `job_max_attempts`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.ids import utcnow
from service.settings import Settings
from service.tables import Dataset

log = logging.getLogger(__name__)

PROCESSING, READY, FAILED = "processing", "ready", "failed"
# A dataset recorded but not sent yet is left this long to the request that is sending it.
SEND_GRACE_SECONDS = 10.0
Send = Callable[[str], None]


@dataclass
class IngestRepairs:
    """What one reconcile pass did to datasets."""

    resent: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    send_failed: bool = False

    def __bool__(self) -> bool:
        return bool(self.resent or self.requeued or self.failed)


def claim(session: Session, dataset_id: str, worker_id: str, settings: Settings) -> str:
    """Take a processing dataset nobody holds (or whose holder stopped beating): "claimed",
    or why not: "not_found", "ready", "failed", "held" (a live worker has it), or
    "too_many_attempts" (then it is failed here)."""
    now = utcnow()
    stale = now - timedelta(seconds=settings.job_stale_after_seconds)
    takeable = sa.and_(
        Dataset.id == dataset_id, Dataset.status == PROCESSING, _unheld_or_stale(stale)
    )
    taken = _update(
        session,
        [takeable, Dataset.attempts < settings.job_max_attempts],
        {
            "worker_id": worker_id,
            "heartbeat_at": now,
            "attempts": Dataset.attempts + 1,
            "progress": {"phase": "extracting"},
        },
    )
    if taken:
        return "claimed"
    row = session.get(Dataset, dataset_id, populate_existing=True)
    if row is None:
        return "not_found"
    if row.status != PROCESSING:
        return row.status
    if row.worker_id is not None and row.heartbeat_at is not None and row.heartbeat_at >= stale:
        return "held"
    message = (
        f"ingestion was started {row.attempts} times (limit {settings.job_max_attempts}) "
        "without finishing; its last worker probably crashed. Upload the archive again."
    )
    _update(session, [takeable], _failed_values("ingest_failed", message, {}, now))
    return "too_many_attempts"


def heartbeat(
    session: Session, dataset_id: str, worker_id: str, progress: Mapping[str, Any]
) -> bool:
    """Beat and store the progress; False when the dataset is no longer this worker's (taken
    over, or deleted): the worker stops."""
    values = {"heartbeat_at": utcnow(), "progress": dict(progress)}
    return _update(session, [_owned(dataset_id, worker_id)], values)


def finish_ready(
    session: Session, dataset_id: str, worker_id: str, values: Mapping[str, Any]
) -> bool:
    """processing -> ready with the index's figures; False when no longer ours."""
    done = {
        **values,
        "status": READY,
        "progress": {"phase": "done"},
        "finished_at": utcnow(),
        "worker_id": None,
    }
    return _update(session, [_owned(dataset_id, worker_id)], done)


def finish_failed(
    session: Session,
    dataset_id: str,
    worker_id: str,
    code: str,
    message: str,
    details: Mapping[str, Any],
) -> bool:
    """processing -> failed with the error a client reads; False when no longer ours."""
    values = _failed_values(code, message, details, utcnow())
    return _update(session, [_owned(dataset_id, worker_id)], values)


def mark_sent(session: Session, dataset_id: str) -> None:
    """The gateway sent the message: the reconciler leaves it alone until resend time."""
    _update(
        session, [Dataset.id == dataset_id, Dataset.status == PROCESSING], {"sent_at": utcnow()}
    )


def reconcile(
    session: Session,
    settings: Settings,
    send: Send,
    now: datetime | None = None,
    *,
    messages_lost: bool = False,
) -> IngestRepairs:
    """Repair what the broker or a dead worker lost; every change is a compare-and-set, so
    several workers may run it at once, and a duplicate message is refused by `claim`."""
    now = now or utcnow()
    report = IngestRepairs()
    stale = now - timedelta(seconds=settings.job_stale_after_seconds)
    held_stale = session.execute(
        sa.select(Dataset.id, Dataset.attempts).where(
            Dataset.status == PROCESSING,
            Dataset.worker_id.is_not(None),
            sa.or_(Dataset.heartbeat_at.is_(None), Dataset.heartbeat_at < stale),
        )
    ).all()
    for dataset_id, attempts in held_stale:
        fence = [Dataset.id == dataset_id, Dataset.status == PROCESSING, _unheld_or_stale(stale)]
        if attempts >= settings.job_max_attempts:
            message = (
                f"the worker ingesting it stopped answering (no heartbeat for "
                f"{settings.job_stale_after_seconds:g} s) on attempt {attempts} of "
                f"{settings.job_max_attempts}. Upload the archive again."
            )
            if _update(session, fence, _failed_values("ingest_failed", message, {}, now)):
                report.failed.append(dataset_id)
        elif _update(session, fence, {"worker_id": None, "heartbeat_at": None, "sent_at": None}):
            report.requeued.append(dataset_id)

    unheld = [Dataset.status == PROCESSING, Dataset.worker_id.is_(None)]
    if messages_lost:  # the broker restarted empty: every unheld dataset counts as unsent
        _update(session, unheld, {"sent_at": None})
    grace = now - timedelta(seconds=SEND_GRACE_SECONDS)
    resend_before = now - timedelta(seconds=settings.job_resend_after_seconds)
    unsent = sa.or_(
        sa.and_(Dataset.sent_at.is_(None), Dataset.created_at < grace),
        sa.and_(Dataset.sent_at.is_(None), Dataset.id.in_(report.requeued)),
        Dataset.sent_at < resend_before,
    )
    due = session.scalars(
        sa.select(Dataset.id).where(*unheld, unsent).order_by(Dataset.created_at)
    ).all()
    for dataset_id in due:
        # Take the turn with a compare-and-set, so two reconcilers do not both send.
        if not _update(session, [Dataset.id == dataset_id, *unheld, unsent], {"sent_at": now}):
            continue
        try:
            send(dataset_id)
        except Exception as exc:  # the broker is down: the next pass (soon) sends the rest
            log.warning("reconciler could not send dataset %s: %s", dataset_id, exc)
            _update(session, [Dataset.id == dataset_id, *unheld], {"sent_at": None})
            report.send_failed = True
            break
        if dataset_id not in report.requeued:
            report.resent.append(dataset_id)
    return report


def _failed_values(
    code: str, message: str, details: Mapping[str, Any], now: datetime
) -> dict[str, Any]:
    return {
        "status": FAILED,
        "error_code": code,
        "error_message": message,
        "error_details": dict(details),
        "progress": None,
        "finished_at": now,
        "worker_id": None,
    }


def _unheld_or_stale(stale: datetime) -> sa.ColumnElement[bool]:
    return sa.or_(
        Dataset.worker_id.is_(None), Dataset.heartbeat_at.is_(None), Dataset.heartbeat_at < stale
    )


def _owned(dataset_id: str, worker_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(
        Dataset.id == dataset_id, Dataset.worker_id == worker_id, Dataset.status == PROCESSING
    )


def _update(
    session: Session, conditions: list[sa.ColumnElement[bool]], values: Mapping[str, Any]
) -> bool:
    """One compare-and-set UPDATE, committed; True when it changed a row."""
    result = session.execute(
        sa.update(Dataset)
        .where(*conditions)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(getattr(result, "rowcount", 0))
