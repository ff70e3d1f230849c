"""Quotas per tenant: what a tenant may hold and how fast its keys may predict.

Three quotas, each a Settings default that an admin may override per tenant (a `tenants` row;
NULL there means the default):

    max_active_jobs          queued + running + cancelling jobs (service.job_states.ACTIVE)
    max_stored_bytes         datasets.bytes + models.bytes: uploaded archives and model artifacts
    predict_rate_per_second  predict requests per second per API key: a token bucket of
                             Settings.predict_burst requests, held in the memory of each gateway
                             process (`RateLimiter`), so N gateway replicas allow N times the rate

Past one: QuotaExceeded, which the web layer answers 429 with Retry-After, its message naming
the quota and its value. Plain functions, no HTTP (docs/architecture.md).

Checks that must hold under concurrency lock the tenant's row (`lock_tenant`: created on
demand, then SELECT ... FOR UPDATE) in the transaction that writes the new job or dataset row,
so two concurrent requests of one tenant cannot both pass on PostgreSQL. SQLite has no row
locks, but serialises writers: the row's INSERT takes its write lock first.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.domain_errors import InvalidRequest, QuotaExceeded
from service.ids import utcnow
from service.job_states import ACTIVE
from service.settings import Settings
from service.tables import Dataset, Job, Model, Tenant, tenant_is

QUOTAS = ("max_active_jobs", "max_stored_bytes", "predict_rate_per_second")
JOBS_RETRY_AFTER = 30  # jobs end on their own: worth a look again soon
BYTES_RETRY_AFTER = 60  # bytes are freed only by deleting something
# The largest values the columns hold (INTEGER, BIGINT).
MAX_VALUES: dict[str, float] = {
    "max_active_jobs": 2**31 - 1,
    "max_stored_bytes": 2**63 - 1,
    "predict_rate_per_second": 1e9,
}


@dataclass(frozen=True)
class Quotas:
    """A tenant's effective quotas; `overridden` names those set for it (the others are the
    Settings defaults)."""

    max_active_jobs: int
    max_stored_bytes: int
    predict_rate_per_second: float
    overridden: tuple[str, ...] = ()


@dataclass(frozen=True)
class Usage:
    active_jobs: int
    stored_bytes: int


def defaults(settings: Settings) -> Quotas:
    return Quotas(
        max_active_jobs=settings.tenant_max_active_jobs,
        max_stored_bytes=settings.tenant_max_stored_bytes,
        predict_rate_per_second=settings.predict_rate_per_second,
    )


def quotas_of(row: Tenant | None, settings: Settings) -> Quotas:
    """The effective quotas of a tenant row (None: no row, every default)."""
    base = defaults(settings)
    if row is None:
        return base
    values = {name: getattr(row, name) for name in QUOTAS}
    overridden = tuple(name for name in QUOTAS if values[name] is not None)
    return Quotas(
        **{name: getattr(base, name) for name in QUOTAS if name not in overridden},
        **{name: values[name] for name in overridden},
        overridden=overridden,
    )


def get_quotas(session: Session, tenant_id: str | None, settings: Settings) -> Quotas:
    """A tenant's effective quotas (reads its row, writes nothing)."""
    row = session.get(Tenant, tenant_id, populate_existing=True) if tenant_id else None
    return quotas_of(row, settings)


def active_jobs(session: Session, tenant_id: str | None) -> int:
    query = (
        sa.select(sa.func.count())
        .select_from(Job)
        .where(tenant_is(Job.tenant_id, tenant_id), Job.status.in_(sorted(ACTIVE)))
    )
    return int(session.scalar(query) or 0)


def stored_bytes(session: Session, tenant_id: str | None) -> int:
    """Bytes the tenant stores: its uploaded archives (a failed one is deleted: not counted)
    plus its models' artifact files."""
    datasets = sa.select(sa.func.coalesce(sa.func.sum(Dataset.bytes), 0)).where(
        tenant_is(Dataset.tenant_id, tenant_id), Dataset.status != "failed"
    )
    models = sa.select(sa.func.coalesce(sa.func.sum(Model.bytes), 0)).where(
        tenant_is(Model.tenant_id, tenant_id)
    )
    return int(session.scalar(datasets) or 0) + int(session.scalar(models) or 0)


def usage(session: Session, tenant_id: str | None) -> Usage:
    return Usage(active_jobs(session, tenant_id), stored_bytes(session, tenant_id))


def lock_tenant(session: Session, tenant_id: str | None) -> Tenant | None:
    """The tenant's row, created on demand (every quota NULL: the defaults) and locked until
    the session's transaction ends. None for tenant None (no keys: nothing to lock)."""
    if tenant_id is None:
        return None
    now = utcnow()
    values = {"id": tenant_id, "created_at": now, "updated_at": now}
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        session.execute(
            insert(Tenant).values(**values).on_conflict_do_nothing(index_elements=["id"])
        )
    elif session.get(Tenant, tenant_id) is None:  # other databases: not race-safe
        session.add(Tenant(**values))
        session.flush()
    query = (
        sa.select(Tenant)
        .where(Tenant.id == tenant_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return session.scalars(query).one()


def check_active_jobs(session: Session, tenant_id: str | None, settings: Settings) -> None:
    """QuotaExceeded unless the tenant may have one more active job. Locks the tenant's row:
    call it in the transaction that inserts the job, right before the insert."""
    limit = quotas_of(lock_tenant(session, tenant_id), settings).max_active_jobs
    current = active_jobs(session, tenant_id)
    if current >= limit:
        raise QuotaExceeded(
            "quota_exceeded",
            f"tenant {tenant_id!r} has {current} queued or running jobs and its quota "
            f"max_active_jobs is {limit}: wait for a job to end or cancel one, or ask an admin "
            "to raise the quota",
            {"quota": "max_active_jobs", "limit": limit, "current": current},
            retry_after=JOBS_RETRY_AFTER,
        )


@dataclass(frozen=True)
class ByteRoom:
    """A tenant's stored-bytes quota and what it stores now."""

    tenant_id: str | None
    limit: int
    stored: int

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.stored)

    def exceeded(self, adding: int | None = None) -> QuotaExceeded:
        """The error for an upload of `adding` bytes (None: more than `remaining`)."""
        size = f"{adding} bytes" if adding is not None else f"more than {self.remaining} bytes"
        details: dict[str, Any] = {
            "quota": "max_stored_bytes",
            "limit": self.limit,
            "current": self.stored,
        }
        if adding is not None:
            details["requested"] = adding
        return QuotaExceeded(
            "quota_exceeded",
            f"tenant {self.tenant_id!r} stores {self.stored} bytes and its quota "
            f"max_stored_bytes is {self.limit}: an upload of {size} does not fit; delete "
            "datasets or models, or ask an admin to raise the quota",
            details,
            retry_after=BYTES_RETRY_AFTER,
        )


def byte_room(session: Session, tenant_id: str | None, settings: Settings) -> ByteRoom:
    limit = get_quotas(session, tenant_id, settings).max_stored_bytes
    return ByteRoom(tenant_id, limit, stored_bytes(session, tenant_id))


def remaining_bytes(session: Session, tenant_id: str | None, settings: Settings) -> int:
    """Bytes the tenant may still store (0 when at or over its quota)."""
    return byte_room(session, tenant_id, settings).remaining


def check_stored_bytes(
    session: Session, tenant_id: str | None, settings: Settings, adding: int
) -> None:
    """QuotaExceeded unless `adding` more bytes fit. Locks the tenant's row: call it in the
    transaction that inserts the row holding those bytes."""
    limit = quotas_of(lock_tenant(session, tenant_id), settings).max_stored_bytes
    room = ByteRoom(tenant_id, limit, stored_bytes(session, tenant_id))
    if adding > room.remaining:
        raise room.exceeded(adding)


def set_quotas(
    session: Session,
    tenant_id: str,
    changes: Mapping[str, int | float | None],
    settings: Settings,
) -> Quotas:
    """Set (a value) or reset (None: back to the Settings default) some of a tenant's quotas;
    those not named are left as they are. Committed; returns the effective quotas."""
    unknown = sorted(set(changes) - set(QUOTAS))
    if unknown:
        raise InvalidRequest(
            "invalid_request", f"unknown quota {unknown[0]!r}; known: {', '.join(QUOTAS)}"
        )
    for name, value in changes.items():
        if value is not None and not 0 < value <= MAX_VALUES[name]:
            raise InvalidRequest(
                "invalid_request",
                f"{name} must be above 0 and at most {MAX_VALUES[name]:g}, got {value}",
                {"field": name},
            )
    row = lock_tenant(session, tenant_id)
    assert row is not None
    for name, value in changes.items():
        if name == "predict_rate_per_second":
            setattr(row, name, None if value is None else float(value))
        else:
            setattr(row, name, None if value is None else int(value))
    row.updated_at = utcnow()
    session.commit()
    return quotas_of(row, settings)


# ---------------------------------------------------------------------------------------------
# The predict rate: a token bucket per key, in memory


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """Token buckets per key (thread-safe), in this process's memory only.

    A key's bucket holds up to `burst` requests and refills at its rate per second; a request
    takes one token, and a refused one takes none. Several gateway processes each keep their
    own buckets: N replicas allow N times the rate. Full buckets are dropped once more than
    `max_keys` exist (a full bucket and no bucket are the same thing). Tenants' rates (a
    database read) are cached for `rate_ttl` seconds.
    """

    def __init__(
        self,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
        rate_ttl: float = 5.0,
    ) -> None:
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.burst = burst
        self.clock = clock
        self.max_keys = max_keys
        self.rate_ttl = rate_ttl
        self._buckets: dict[str, _Bucket] = {}
        self._rates: dict[str, tuple[float, float]] = {}  # tenant -> (rate, read at)
        self._lock = threading.Lock()

    def acquire(self, key: str, rate: float) -> float:
        """Take one token from `key`'s bucket: 0.0 when the request may go ahead, else the
        seconds until a token is there (nothing is taken then)."""
        if rate <= 0:
            raise ValueError("rate must be above 0")
        with self._lock:
            now = self.clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self.max_keys:
                    self._prune(now, rate)
                bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            else:
                elapsed = max(0.0, now - bucket.at)
                bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * rate)
                bucket.at = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / rate

    def _prune(self, now: float, rate: float) -> None:
        full = [
            key
            for key, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.at) * rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]

    def cached_rate(self, tenant_id: str) -> float | None:
        """The tenant's rate read less than `rate_ttl` seconds ago, else None."""
        with self._lock:
            cached = self._rates.get(tenant_id)
            if cached is None or self.clock() - cached[1] >= self.rate_ttl:
                return None
            return cached[0]

    def remember_rate(self, tenant_id: str, rate: float) -> None:
        with self._lock:
            if len(self._rates) >= self.max_keys:
                self._rates.clear()
            self._rates[tenant_id] = (rate, self.clock())

    def forget_rate(self, tenant_id: str) -> None:
        """Drop the cached rate (after an admin changed it on this process)."""
        with self._lock:
            self._rates.pop(tenant_id, None)


def rate_limited(rate: float, burst: int, wait: float) -> QuotaExceeded:
    """The error for a predict request over its key's rate; Retry-After: ceil(wait) s."""
    retry_after = max(1, math.ceil(wait))
    return QuotaExceeded(
        "rate_limited",
        f"this API key sent predict requests faster than its quota predict_rate_per_second "
        f"of {rate:g} (bursts of {burst}, per gateway process); retry after {retry_after} s",
        {
            "quota": "predict_rate_per_second",
            "limit": rate,
            "burst": burst,
            "retry_after_seconds": round(wait, 3),
        },
        retry_after=retry_after,
    )


__all__ = [
    "QUOTAS",
    "ByteRoom",
    "Quotas",
    "RateLimiter",
    "Usage",
    "active_jobs",
    "byte_room",
    "check_active_jobs",
    "check_stored_bytes",
    "defaults",
    "get_quotas",
    "lock_tenant",
    "quotas_of",
    "rate_limited",
    "remaining_bytes",
    "set_quotas",
    "stored_bytes",
    "usage",
]
