"""Per-deployment, per-model figures: requests, errors, images, latency, the first label of
each answer and, for a shadow, how often it agreed with the target that answered.

Counted in memory per process (no database write per request) and added to the
`deployment_stats` rows every BITSERVE_DEPLOYMENT_STATS_FLUSH_SECONDS and at shutdown, so the
figures read back are those of every gateway together, at most one flush interval old.
Latency is kept as counts per bucket (LATENCY_BOUNDS_MS): percentiles are bucket bounds.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import Database
from service.ids import utcnow
from service.tables import DeploymentStat

log = logging.getLogger(__name__)

# Upper bounds of the latency buckets (ms); the last bucket is everything above.
LATENCY_BOUNDS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
MAX_LABELS = 1000  # first labels kept per row: a model has at most this many classes here


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    images: int = 0
    latency_ms_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))
    top1: Counter[str] = field(default_factory=Counter)
    compared: int = 0
    agreed: int = 0

    def add_latency(self, ms: float) -> None:
        self.latency_ms_sum += ms
        self.buckets[bisect.bisect_left(LATENCY_BOUNDS_MS, ms)] += 1


Key = tuple[str, str, str]  # deployment_id, model_id, role


class DeploymentStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # recorded on the event loop, flushed from a thread
        self._pending: dict[Key, Tally] = {}

    def record(
        self,
        deployment_id: str,
        model_id: str,
        role: str,
        *,
        latency_ms: float,
        labels: Sequence[str] = (),
        error: bool = False,
        agreed: int | None = None,
    ) -> None:
        """One request answered (or failed) by a model; `labels`: the first label of each
        image; `agreed`: for a shadow, how many of them the answering target's matched."""
        with self._lock:
            tally = self._pending.setdefault((deployment_id, model_id, role), Tally())
            tally.requests += 1
            tally.errors += int(error)
            tally.images += len(labels)
            tally.add_latency(latency_ms)
            tally.top1.update(labels)
            if agreed is not None:
                tally.compared += len(labels)
                tally.agreed += agreed

    def take(self) -> dict[Key, Tally]:
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def flush(self, db: Database) -> int:
        """Add what was counted since the last flush to the rows; returns the rows written.
        What cannot be written (the database is down) is counted again for the next flush."""
        pending = self.take()
        if not pending:
            return 0
        try:
            with db.sessionmaker() as session:
                for key, tally in pending.items():
                    _add(session, key, tally)
                session.commit()
        except Exception as exc:
            log.warning("deployment figures not written (kept for the next try): %s", exc)
            self._restore(pending)
            return 0
        return len(pending)

    def _restore(self, pending: dict[Key, Tally]) -> None:
        with self._lock:
            for key, tally in pending.items():
                mine = self._pending.setdefault(key, Tally())
                _merge(mine, tally)


async def flush_every(stats: DeploymentStats, db: Database, seconds: float) -> None:
    """The gateway's flush loop (cancelled at shutdown, which flushes once more)."""
    while True:
        await asyncio.sleep(seconds)
        await asyncio.to_thread(stats.flush, db)


def _merge(into: Tally, other: Tally) -> None:
    into.requests += other.requests
    into.errors += other.errors
    into.images += other.images
    into.latency_ms_sum += other.latency_ms_sum
    into.buckets = [a + b for a, b in zip(into.buckets, other.buckets, strict=True)]
    into.top1.update(other.top1)
    into.compared += other.compared
    into.agreed += other.agreed


def _add(session: Session, key: Key, tally: Tally) -> None:
    deployment_id, model_id, role = key
    for attempt in range(2):
        row = session.scalars(
            sa.select(DeploymentStat)
            .where(
                DeploymentStat.deployment_id == deployment_id,
                DeploymentStat.model_id == model_id,
                DeploymentStat.role == role,
            )
            .with_for_update()  # another gateway adds its counts to the same row
        ).one_or_none()
        if row is not None:
            row.requests += tally.requests
            row.errors += tally.errors
            row.images += tally.images
            row.latency_ms_sum += tally.latency_ms_sum
            row.latency_buckets = [
                a + b for a, b in zip(row.latency_buckets, tally.buckets, strict=True)
            ]
            top1 = Counter(row.top1)
            top1.update(tally.top1)
            row.top1 = dict(top1.most_common(MAX_LABELS))
            row.compared += tally.compared
            row.agreed += tally.agreed
            row.updated_at = utcnow()
            return
        try:
            with session.begin_nested():
                session.add(
                    DeploymentStat(
                        deployment_id=deployment_id,
                        model_id=model_id,
                        role=role,
                        requests=tally.requests,
                        errors=tally.errors,
                        images=tally.images,
                        latency_ms_sum=tally.latency_ms_sum,
                        latency_buckets=list(tally.buckets),
                        top1=dict(tally.top1.most_common(MAX_LABELS)),
                        compared=tally.compared,
                        agreed=tally.agreed,
                        updated_at=utcnow(),
                    )
                )
            return
        except IntegrityError:
            if attempt:  # the deployment was deleted meanwhile: its figures go with it
                return
            continue  # another gateway inserted it first: add to theirs


def read(session: Session, deployment_id: str) -> list[DeploymentStat]:
    return list(
        session.scalars(
            sa.select(DeploymentStat).where(DeploymentStat.deployment_id == deployment_id)
        )
    )


def percentile_ms(buckets: Iterable[int], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile (None above the last bound)."""
    counts = list(buckets)
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        seen += count
        if seen >= rank and count:
            return float(LATENCY_BOUNDS_MS[i]) if i < len(LATENCY_BOUNDS_MS) else None
    return None


def summary(row: DeploymentStat) -> dict[str, Any]:
    latency = None
    if row.requests:
        latency = {
            "mean": round(row.latency_ms_sum / row.requests, 3),
            "p50": percentile_ms(row.latency_buckets, 0.5),
            "p95": percentile_ms(row.latency_buckets, 0.95),
        }
    return {
        "requests": row.requests,
        "errors": row.errors,
        "images": row.images,
        "latency_ms": latency,
        "top1_labels": dict(sorted(row.top1.items(), key=lambda kv: (-kv[1], kv[0]))),
        "agreement": {"compared": row.compared, "agreed": row.agreed}
        if row.role == "shadow"
        else None,
    }
