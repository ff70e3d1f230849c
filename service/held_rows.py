"""Rows a worker holds while it works: what evaluations and batch predictions share.

Both tables have the same shape for this (id, status, worker_id, heartbeat_at, sent_at,
created_at, dataset_id) and the same rules as dataset ingestion (service.ingest_runs): the
row is the truth, a broker message only names it; every write is a compare-and-set, so
several workers and reconcilers may act at once. service.evaluation_runs and
service.batch_prediction_runs keep what differs (claim, finishing, cancel); the conditions,
the wait for a dataset being ingested and the resending of unsent rows are here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.settings import Settings
from service.tables import BatchPrediction, Evaluation

log = logging.getLogger(__name__)

QUEUED, RUNNING = "queued", "running"
# A row committed but not yet sent is the request's to send this long (it may be sending now).
SEND_GRACE_SECONDS = 10.0
HeldTable = type[Evaluation] | type[BatchPrediction]
Send = Callable[[str], None]


def update(
    session: Session,
    table: HeldTable,
    conditions: Sequence[sa.ColumnElement[bool]],
    values: Mapping[str, Any],
) -> bool:
    """One compare-and-set UPDATE, committed; True when it changed a row."""
    result = session.execute(
        sa.update(table)
        .where(*conditions)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(getattr(result, "rowcount", 0))


def stale(table: HeldTable, before: datetime) -> sa.ColumnElement[bool]:
    """Nobody beats for it: no heartbeat yet, or the last one is older than `before`."""
    return sa.or_(table.heartbeat_at.is_(None), table.heartbeat_at < before)


def takeable(table: HeldTable, before: datetime) -> sa.ColumnElement[bool]:
    """Queued, or running under a worker that stopped beating."""
    return sa.or_(table.status == QUEUED, sa.and_(table.status == RUNNING, stale(table, before)))


def owned(
    table: HeldTable, row_id: str, worker_id: str, statuses: Sequence[str] = (RUNNING,)
) -> sa.ColumnElement[bool]:
    return sa.and_(table.id == row_id, table.worker_id == worker_id, table.status.in_(statuses))


def mark_sent(session: Session, table: HeldTable, row_id: str, now: datetime) -> None:
    """The request sent the message: the reconciler leaves the row alone until resend time."""
    update(session, table, [table.id == row_id, table.status == QUEUED], {"sent_at": now})


def waiting(session: Session, table: HeldTable, dataset_id: str) -> list[str]:
    """Queued rows on a dataset (they wait while it is being ingested)."""
    query = sa.select(table.id).where(table.dataset_id == dataset_id, table.status == QUEUED)
    return list(session.scalars(query).all())


def send_waiting(
    session: Session, table: HeldTable, dataset_id: str, send: Send, now: datetime
) -> list[str]:
    """The dataset is ready: send the rows that waited for it (a failed send is the
    reconciler's to repeat: the row stays unsent)."""
    sent = []
    for row_id in waiting(session, table, dataset_id):
        try:
            send(row_id)
        except Exception as exc:
            log.warning("%s not sent: %s (the reconciler will)", row_id, exc)
            continue
        mark_sent(session, table, row_id, now)
        sent.append(row_id)
    return sent


def fail_waiting(
    session: Session,
    table: HeldTable,
    dataset_id: str,
    code: str,
    message: str,
    failed_values: Callable[[str, str, datetime], Mapping[str, Any]],
    now: datetime,
) -> list[str]:
    """The dataset failed ingestion: so do the rows that waited for it (`dataset_failed`,
    quoting the dataset's own error)."""
    text = f"the dataset {dataset_id} could not be ingested: {code}: {message}"
    values = failed_values("dataset_failed", text, now)
    return [
        row_id
        for row_id in waiting(session, table, dataset_id)
        if update(session, table, [table.id == row_id, table.status == QUEUED], values)
    ]


def resend_unsent(
    session: Session,
    table: HeldTable,
    settings: Settings,
    send: Send,
    now: datetime,
    requeued: Sequence[str],
    resent: list[str],
) -> bool:
    """Send the queued rows whose message was never sent (past the grace), was sent too long
    ago, or that were just requeued; appends to `resent` those not in `requeued`. Returns
    True when a send failed (the broker is down: the next pass sends the rest)."""
    grace = now - timedelta(seconds=SEND_GRACE_SECONDS)
    resend_before = now - timedelta(seconds=settings.job_resend_after_seconds)
    unsent = sa.or_(
        sa.and_(table.sent_at.is_(None), table.created_at < grace),
        table.id.in_(list(requeued)),
        table.sent_at < resend_before,
    )
    due = session.scalars(
        sa.select(table.id).where(table.status == QUEUED, unsent).order_by(table.created_at)
    ).all()
    for row_id in due:
        # Take the turn with a compare-and-set, so two reconcilers do not both send.
        turn = [table.id == row_id, table.status == QUEUED, unsent]
        if not update(session, table, turn, {"sent_at": now}):
            continue
        try:
            send(row_id)
        except Exception as exc:
            log.warning("reconciler could not send %s: %s", row_id, exc)
            update(session, table, [table.id == row_id], {"sent_at": None})
            return True
        if row_id not in requeued:
            resent.append(row_id)
    return False
