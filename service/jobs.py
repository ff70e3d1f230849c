"""Fine-tuning jobs, the REST side: planning, creating, reading, listing and cancelling.

The database is the source of truth; the broker only carries "work on job X"
(docs/operations.md, "Long jobs on Celery + Redis"). So:
- a job row is committed before its message is sent, and a failed send leaves it queued for
  the reconciler to re-send;
- a worker takes a job with a compare-and-set UPDATE (`claim`), so a duplicated or
  redelivered message can never run a job twice at once, and every later write of that worker
  is fenced by its `worker_id` (a worker that lost the job cannot overwrite it);
- attempts are counted here, not in the broker, so a job that kills its worker cannot loop.

The states and the allowed transitions are in service.job_states; the worker-side transitions
and the reconciler live in service.job_runs. No FastAPI here (the worker imports this module):
errors are the kinds of service.domain_errors, which the web layer maps to HTTP statuses.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bitcore import hyperrule
from bitcore.data.split import validation_count
from bitcore.models import MODEL_SPECS
from service import job_costs, quotas
from service.domain_errors import Conflict, InvalidRequest, NotFound, QuotaExceeded
from service.ids import new_id, utcnow
from service.job_runs import Send, transition
from service.job_states import JobStatus
from service.settings import Settings
from service.tables import Dataset, Job, JobHistory, tenant_is

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobRequest:
    """The body of POST /v1/jobs, normalised (its fingerprint decides idempotent replays)."""

    dataset_id: str
    base_model: str
    validation_fraction: float = 0.1
    seed: int = 0
    serving_precision: str = "fp32"
    overrides: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    deploy_to: str | None = None
    deploy_if_better: bool = False

    def fingerprint(self) -> str:
        fields = asdict(self)
        # Absent when default: requests recorded before the fields existed replay as before.
        for key, default in (
            ("serving_precision", "fp32"),
            ("deploy_to", None),
            ("deploy_if_better", False),
        ):
            if fields[key] == default:
                del fields[key]
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Planning


def training_examples(counts: Sequence[int], validation_fraction: float) -> int:
    """Images left for training after the stratified split (bitcore.data.split rules).

    Per class round(n * fraction) (half up) go to validation; a class with >= 2 images keeps at
    least one image on each side. The HyperRule schedule depends on this number (BiT sec. 3.3).
    """
    return sum(count - validation_count(count, validation_fraction) for count in counts)


def plan_for_dataset(
    dataset: Dataset, base_model: str, validation_fraction: float, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """The HyperRule plan (REST shape) for `dataset`; raises InvalidRequest naming a bad field."""
    spec = MODEL_SPECS.get(base_model)
    if spec is None:
        raise InvalidRequest(
            "unknown_base_model",
            f"base_model: unknown base model {base_model!r}; GET /v1/base-models lists them",
            {"field": "base_model", "known": sorted(MODEL_SPECS)},
        )
    if not 0.0 <= validation_fraction < 1.0:
        raise InvalidRequest(
            "invalid_request",
            f"validation_fraction must be in [0, 1), got {validation_fraction}",
            {"field": "validation_fraction"},
        )
    counts = [int(c["count"]) for c in dataset.classes]
    num_examples = training_examples(counts, validation_fraction)
    size = (int(dataset.image_size["median_height"]), int(dataset.image_size["median_width"]))
    try:
        plan = hyperrule.plan(num_examples, size, **dict(overrides))
    except hyperrule.PlanError as exc:
        from_overrides = exc.field in overrides or exc.field in hyperrule.OVERRIDABLE
        where = f"overrides.{exc.field}" if from_overrides else exc.field
        raise InvalidRequest("invalid_override", str(exc), {"field": where}) from None
    body = plan.to_dict()
    # Unpublished registry variants have no checkpoint: they train from random init.
    body["source"]["from_scratch"] = not spec.published
    return body


# ---------------------------------------------------------------------------------------------
# REST side


def create_job(
    session: Session,
    request: JobRequest,
    *,
    send: Send,
    settings: Settings,
    tenant_id: str | None = None,
    idempotency_key: str | None = None,
    now: datetime | None = None,
) -> tuple[Job, bool]:
    """Validate, plan, check the tenant's active-jobs quota, commit the queued job, then send
    it. Returns (job, created).

    `created` is False for an idempotent replay (same key, same body), answered even when the
    tenant is at its quota. The quota is checked under a lock of the tenant's row held until
    the job's insert commits (service.quotas), so concurrent requests cannot both pass it.
    A failed send is logged and leaves the job queued with no `enqueued_at`: the reconciler
    sends it later.
    """
    digest = request.fingerprint()
    if idempotency_key is not None:
        existing = _by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return _replay(existing, digest), False

    dataset = session.get(Dataset, request.dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise NotFound("dataset", request.dataset_id)
    if dataset.status != "ready":
        # The same details as /plan and /rejected give (service.datasets.not_ready, which
        # this module cannot import: service.datasets imports it).
        raise Conflict(
            "dataset_not_ready",
            f"dataset {dataset.id} is {dataset.status}, not ready",
            {"status": dataset.status},
        )
    plan = plan_for_dataset(
        dataset, request.base_model, request.validation_fraction, request.overrides
    )
    job_costs.check_cost(
        plan, request.base_model, dataset.num_images, settings, dataset_bytes=dataset.bytes
    )
    try:
        quotas.check_active_jobs(session, tenant_id, settings)
    except QuotaExceeded:
        session.rollback()  # releases the tenant's lock
        # A concurrent request with the same Idempotency-Key may have made this very job
        # while this one waited for the lock: that is a replay, not a new job.
        existing = (
            _by_idempotency_key(session, tenant_id, idempotency_key) if idempotency_key else None
        )
        if existing is not None:
            return _replay(existing, digest), False
        raise
    now = now or utcnow()
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        dataset_id=dataset.id,
        base_model=request.base_model,
        name=request.name,
        status=JobStatus.QUEUED,
        plan=plan,
        validation_fraction=request.validation_fraction,
        seed=request.seed,
        serving_precision=request.serving_precision,
        deploy_to=request.deploy_to,
        deploy_if_better=request.deploy_if_better,
        overrides=dict(request.overrides),
        idempotency_key=idempotency_key,
        request_hash=digest,
        progress=None,
        attempts=0,
        cancel_requested=False,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the insert, or the dataset
        # was deleted since it was read (the foreign key refused the job).
        session.rollback()
        existing = (
            _by_idempotency_key(session, tenant_id, idempotency_key) if idempotency_key else None
        )
        if existing is not None:
            return _replay(existing, digest), False
        if session.get(Dataset, request.dataset_id, populate_existing=True) is None:
            raise NotFound("dataset", request.dataset_id) from None
        raise
    enqueue(session, job.id, send)
    return job, True


def enqueue(session: Session, job_id: str, send: Send, now: datetime | None = None) -> bool:
    """Send "work on job_id" and record when; False (job left for the reconciler) on failure."""
    try:
        send(job_id)
    except Exception as exc:
        log.warning("could not send job %s to the broker (the reconciler will): %s", job_id, exc)
        return False
    session.execute(
        sa.update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(enqueued_at=now or utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return True


def _by_idempotency_key(session: Session, tenant_id: str | None, key: str) -> Job | None:
    return session.scalars(
        sa.select(Job)
        .where(tenant_is(Job.tenant_id, tenant_id), Job.idempotency_key == key)
        .limit(1)
    ).first()


def _replay(existing: Job, digest: str) -> Job:
    if existing.request_hash != digest:
        raise Conflict(
            "idempotency_conflict",
            "this Idempotency-Key was already used with a different request body; "
            "use a new key for a new job",
            {"job_id": existing.id},
        )
    return existing


def get_job(session: Session, tenant_id: str | None, job_id: str) -> Job:
    """The tenant's job; NotFound for unknown ids and other tenants' jobs alike."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound("job", job_id)
    return job


def get_job_history(
    session: Session, tenant_id: str | None, job_id: str
) -> tuple[Job, dict[str, Any]]:
    """The tenant's job and its stored curves ({} before its first training step)."""
    job = get_job(session, tenant_id, job_id)
    row = session.get(JobHistory, job_id, populate_existing=True)
    return job, dict(row.history) if row is not None else {}


def list_jobs(tenant_id: str | None, status: JobStatus | None = None) -> sa.Select[Job]:
    """The tenant's jobs, optionally of one status (paginate it with service.pagination)."""
    query = sa.select(Job).where(tenant_is(Job.tenant_id, tenant_id))
    if status is not None:
        query = query.where(Job.status == JobStatus(status))
    return query


def request_cancel(
    session: Session, tenant_id: str | None, job_id: str, now: datetime | None = None
) -> Job:
    """queued -> cancelled now; running -> cancelling (the worker stops between steps)."""
    now = now or utcnow()
    for _ in range(5):  # each turn loses at most one race with a worker transition
        job = get_job(session, tenant_id, job_id)
        if job.status == JobStatus.CANCELLING:
            return job
        if job.status.finished:
            raise Conflict("job_finished", f"job {job_id} already {job.status}")
        values: dict[str, Any] = {"cancel_requested": True, "updated_at": now}
        if job.status == JobStatus.QUEUED:
            target = JobStatus.CANCELLED
            values["finished_at"] = now
        else:
            target = JobStatus.CANCELLING
        if transition(session, job_id, (job.status,), target, values):
            return get_job(session, tenant_id, job_id)
    raise Conflict("conflict", f"job {job_id} changed state repeatedly; try again")


__all__ = [
    "JobRequest",
    "create_job",
    "enqueue",
    "get_job",
    "list_jobs",
    "plan_for_dataset",
    "request_cancel",
    "training_examples",
]
