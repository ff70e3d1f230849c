"""Quotas (service.quotas): the predict token bucket on a fake clock, and the tenant quotas on
real SQLite and PostgreSQL (tests/unit/conftest.py): effective values, setting and resetting,
usage, and the active-jobs check that service.jobs.create_job runs under the tenant's lock."""

from __future__ import annotations

import threading
import uuid

import pytest
import sqlalchemy as sa

from service import jobs, quotas
from service.db import Database
from service.domain_errors import DomainError, InvalidRequest, QuotaExceeded
from service.http_errors import status_of
from service.ids import new_id
from service.job_states import JobStatus
from service.settings import Settings
from service.tables import Job, Model, Tenant
from tests.unit.job_helpers import add_dataset


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the token bucket ---------------------------------------------------------------------


def test_a_fresh_key_has_its_burst_then_waits_for_the_rate() -> None:
    clock = Clock()
    limiter = quotas.RateLimiter(burst=3, clock=clock)
    assert [limiter.acquire("k", rate=2.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("k", rate=2.0) == pytest.approx(0.5)  # one token per 1/2 s
    clock.now += 0.2
    assert limiter.acquire("k", rate=2.0) == pytest.approx(0.3)  # a refusal takes nothing
    clock.now += 0.3
    assert limiter.acquire("k", rate=2.0) == 0.0
    assert limiter.acquire("k", rate=2.0) == pytest.approx(0.5)


def test_the_bucket_refills_up_to_the_burst_only() -> None:
    clock = Clock()
    limiter = quotas.RateLimiter(burst=4, clock=clock)
    for _ in range(4):
        assert limiter.acquire("k", rate=10.0) == 0.0
    clock.now += 3600  # an hour idle: still 4, not 36,000
    allowed = [limiter.acquire("k", rate=10.0) == 0.0 for _ in range(6)]
    assert allowed == [True] * 4 + [False] * 2


def test_over_time_the_rate_holds() -> None:
    clock = Clock()
    limiter = quotas.RateLimiter(burst=5, clock=clock)
    allowed = 0
    for _ in range(1000):  # 100 requests per second for 10 s, at 5 per second
        allowed += limiter.acquire("k", rate=5.0) == 0.0
        clock.now += 0.01
    assert allowed == 5 + 50 or allowed == 5 + 49  # the burst, then 5 per second


def test_keys_have_their_own_buckets() -> None:
    limiter = quotas.RateLimiter(burst=1, clock=Clock())
    assert limiter.acquire("a", rate=1.0) == 0.0
    assert limiter.acquire("a", rate=1.0) > 0
    assert limiter.acquire("b", rate=1.0) == 0.0


def test_concurrent_takers_never_get_more_than_the_burst() -> None:
    limiter = quotas.RateLimiter(burst=25, clock=Clock())  # the clock stands still
    allowed: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def take() -> None:
        start.wait()
        mine = [limiter.acquire("k", rate=1.0) == 0.0 for _ in range(50)]
        with lock:
            allowed.extend(mine)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(allowed) == 400 and sum(allowed) == 25


def test_full_buckets_are_dropped_past_max_keys() -> None:
    clock = Clock()
    limiter = quotas.RateLimiter(burst=2, clock=clock, max_keys=2)
    limiter.acquire("a", rate=1.0)
    limiter.acquire("b", rate=1.0)
    clock.now += 10  # both full again: forgetting them changes nothing
    limiter.acquire("c", rate=1.0)
    assert set(limiter._buckets) == {"c"}


def test_rates_are_cached_for_their_ttl() -> None:
    clock = Clock()
    limiter = quotas.RateLimiter(burst=1, clock=clock, rate_ttl=5.0)
    assert limiter.cached_rate("t") is None
    limiter.remember_rate("t", 7.0)
    clock.now += 4.9
    assert limiter.cached_rate("t") == 7.0
    clock.now += 0.1
    assert limiter.cached_rate("t") is None
    limiter.remember_rate("t", 8.0)
    limiter.forget_rate("t")
    assert limiter.cached_rate("t") is None


def test_the_rate_limited_error_names_the_quota_and_rounds_up() -> None:
    error = quotas.rate_limited(5.0, 5, 0.2)
    assert (status_of(error), error.code, error.retry_after) == (429, "rate_limited", 1)
    assert "predict_rate_per_second" in error.message and " 5 " in error.message
    assert error.details == {
        "quota": "predict_rate_per_second",
        "limit": 5.0,
        "burst": 5,
        "retry_after_seconds": 0.2,
    }
    assert quotas.rate_limited(0.5, 1, 1.5).retry_after == 2


def test_bad_limiter_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        quotas.RateLimiter(burst=0)
    with pytest.raises(ValueError):
        quotas.RateLimiter(burst=1).acquire("k", rate=0.0)


# -- tenant quotas on the database ----------------------------------------------------------


@pytest.fixture
def settings() -> Settings:
    return Settings(
        tenant_max_active_jobs=3, tenant_max_stored_bytes=10_000, predict_rate_per_second=9.0
    )


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _create(
    db: Database,
    settings: Settings,
    dataset_id: str,
    tenant: str,
    key: str | None = None,
    **kw: object,
) -> Job:
    request = jobs.JobRequest(dataset_id=dataset_id, base_model="tiny-R10x0.25", **kw)  # type: ignore[arg-type]
    with db.sessionmaker() as session:
        job, _ = jobs.create_job(
            session,
            request,
            send=lambda _: None,
            settings=settings,
            tenant_id=tenant,
            idempotency_key=key,
        )
    return job


def _count_jobs(db: Database, tenant: str) -> int:
    with db.sessionmaker() as session:
        query = sa.select(sa.func.count()).select_from(Job).where(Job.tenant_id == tenant)
        return int(session.scalar(query) or 0)


def test_defaults_overrides_and_resets(db: Database, settings: Settings) -> None:
    tenant = _tenant()
    with db.sessionmaker() as session:
        assert quotas.get_quotas(session, tenant, settings) == quotas.Quotas(3, 10_000, 9.0, ())
        changed = quotas.set_quotas(session, tenant, {"max_active_jobs": 7}, settings)
        assert changed == quotas.Quotas(7, 10_000, 9.0, ("max_active_jobs",))
        changed = quotas.set_quotas(
            session, tenant, {"max_stored_bytes": 50, "predict_rate_per_second": 0.5}, settings
        )
        assert changed == quotas.Quotas(7, 50, 0.5, tuple(quotas.QUOTAS))  # partial: 7 stays
        changed = quotas.set_quotas(session, tenant, {"max_active_jobs": None}, settings)
        assert changed.max_active_jobs == 3 and "max_active_jobs" not in changed.overridden
    with db.sessionmaker() as session:  # committed
        row = session.get(Tenant, tenant)
        assert row is not None and row.max_active_jobs is None and row.max_stored_bytes == 50
        assert quotas.get_quotas(session, tenant, settings).max_stored_bytes == 50


@pytest.mark.parametrize(
    "changes",
    [{"max_active_jobs": 0}, {"max_stored_bytes": -1}, {"max_active_jobs": 2**31}, {"colour": 1}],
)
def test_bad_quota_values_are_refused(
    db: Database, settings: Settings, changes: dict[str, int]
) -> None:
    with db.sessionmaker() as session, pytest.raises(InvalidRequest):
        quotas.set_quotas(session, _tenant(), changes, settings)


def test_the_job_past_the_quota_is_refused_and_nothing_is_written(
    db: Database, settings: Settings
) -> None:
    tenant = _tenant()
    dataset_id = add_dataset(db, tenant=tenant)
    made = [_create(db, settings, dataset_id, tenant, seed=i) for i in range(3)]
    with pytest.raises(QuotaExceeded) as err:
        _create(db, settings, dataset_id, tenant, seed=9)
    assert (status_of(err.value), err.value.code, err.value.retry_after) == (
        429,
        "quota_exceeded",
        quotas.JOBS_RETRY_AFTER,
    )
    assert err.value.details == {"quota": "max_active_jobs", "limit": 3, "current": 3}
    assert "max_active_jobs" in err.value.message and " 3" in err.value.message
    assert _count_jobs(db, tenant) == 3
    # Other tenants are not affected; a finished job no longer counts.
    other = _tenant()
    _create(db, settings, add_dataset(db, tenant=other), other)
    with db.sessionmaker() as session:
        jobs.request_cancel(session, tenant, made[0].id)
        assert quotas.usage(session, tenant) == quotas.Usage(3 - 1, 1234)
    _create(db, settings, dataset_id, tenant, seed=10)
    assert _count_jobs(db, tenant) == 4


def _limited(db: Database, settings: Settings, max_active_jobs: int) -> tuple[str, str]:
    """A new tenant with this job quota, and a dataset of its own: (tenant, dataset id)."""
    tenant = _tenant()
    dataset_id = add_dataset(db, tenant=tenant)
    with db.sessionmaker() as session:
        quotas.set_quotas(session, tenant, {"max_active_jobs": max_active_jobs}, settings)
    return tenant, dataset_id


def test_an_idempotent_replay_is_answered_at_the_limit(db: Database, settings: Settings) -> None:
    tenant, dataset_id = _limited(db, settings, 1)
    first = _create(db, settings, dataset_id, tenant, key="k")
    assert _create(db, settings, dataset_id, tenant, key="k").id == first.id
    with pytest.raises(QuotaExceeded):
        _create(db, settings, dataset_id, tenant, key="another")
    assert _count_jobs(db, tenant) == 1


def test_concurrent_creates_cannot_both_pass(db: Database, settings: Settings) -> None:
    tenant, dataset_id = _limited(db, settings, 2)
    start = threading.Barrier(6)
    outcomes: list[str] = []

    def create(seed: int) -> None:
        start.wait()
        try:
            _create(db, settings, dataset_id, tenant, seed=seed)
            outcomes.append("created")
        except DomainError as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["created"] * 2 + ["quota_exceeded"] * 4
    assert _count_jobs(db, tenant) == 2


def test_stored_bytes_are_datasets_plus_models(db: Database, settings: Settings) -> None:
    tenant = _tenant()
    add_dataset(db, tenant=tenant)  # 1234 bytes
    add_dataset(db, tenant=_tenant())  # another tenant's
    with db.sessionmaker() as session:
        session.add(
            Model(
                id=new_id("mdl"),
                tenant_id=tenant,
                base_model="tiny-R10x0.25",
                classes=["a"],
                plan={},
                metrics=None,
                input={},
                storage_key="models/x",
                bytes=766,
            )
        )
        session.commit()
        assert quotas.stored_bytes(session, tenant) == 2000
        room = quotas.byte_room(session, tenant, settings)
        assert (room.limit, room.stored, room.remaining) == (10_000, 2000, 8000)
        quotas.check_stored_bytes(session, tenant, settings, 8000)  # exactly fits
        session.rollback()
        with pytest.raises(QuotaExceeded) as err:
            quotas.check_stored_bytes(session, tenant, settings, 8001)
        session.rollback()
    assert err.value.details == {
        "quota": "max_stored_bytes",
        "limit": 10_000,
        "current": 2000,
        "requested": 8001,
    }
    assert "max_stored_bytes" in err.value.message and "10000" in err.value.message
    assert quotas.ByteRoom(tenant, 100, 150).remaining == 0


def test_active_means_queued_running_or_cancelling(db: Database, settings: Settings) -> None:
    tenant = _tenant()
    dataset_id = add_dataset(db, tenant=tenant)
    ids = [_create(db, settings, dataset_id, tenant, seed=i).id for i in range(3)]
    with db.sessionmaker() as session:
        states = (JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.FAILED)
        for job_id, status in zip(ids, states, strict=True):
            session.execute(sa.update(Job).where(Job.id == job_id).values(status=status))
        session.commit()
        assert quotas.active_jobs(session, tenant) == 2
