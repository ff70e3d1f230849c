"""The fine-tuning job state machine: plain functions used by the REST routes and the worker.

The database is the source of truth; the broker only carries "work on job X"
(operations.md, "Long jobs on Celery + Redis"). So:
- a job row is committed before its message is sent, and a failed send leaves it queued for
  the reconciler to re-send;
- a worker takes a job with a compare-and-set UPDATE (`claim`), so a duplicated or
  redelivered message can never run a job twice at once, and every later write of that worker
  is fenced by its `worker_id` (a worker that lost the job cannot overwrite it);
- attempts are counted here, not in the broker, so a job that kills its worker cannot loop.

    queued --claim--> running --finish_succeeded--> succeeded
      |                 |  |----finish_failed-----> failed
      |<----release-----|  |   (orderly worker shutdown, after a checkpoint)
      |                 |  '-request_cancel-> cancelling --finish_cancelled--> cancelled
      '--request_cancel------------------------------------------------------> cancelled

This module holds the REST side and planning; the worker-side transitions and the reconciler
live in service.job_runs and are re-exported here, so `jobs.claim` and friends keep one name.
It must stay importable by the worker: no FastAPI here (errors are `JobError`, which the
router maps to the API's error shape).
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
from service.api_error import ApiError
from service.ids import new_id, rfc3339, utcnow
from service.job_runs import (
    FINISHED_STATES,
    SEND_GRACE_SECONDS,
    Claim,
    Reconciled,
    Send,
    cas,
    claim,
    finish_cancelled,
    finish_failed,
    finish_succeeded,
    heartbeat,
    reconcile,
    record_progress,
    release,
)
from service.tables import ACTIVE_JOB_STATES, JOB_STATES, Dataset, Job, tenant_is

log = logging.getLogger(__name__)


class JobError(ApiError):
    """A refusal the client can act on. An ApiError, so the gateway's handlers answer it in the
    error shape as it is; this module still imports no web framework (the worker uses it)."""


@dataclass(frozen=True)
class JobRequest:
    """The body of POST /v1/jobs, normalised (its fingerprint decides idempotent replays)."""

    dataset_id: str
    base_model: str
    validation_fraction: float = 0.1
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    def fingerprint(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
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
    """The HyperRule plan (REST shape) for `dataset`; raises JobError naming a bad field."""
    spec = MODEL_SPECS.get(base_model)
    if spec is None:
        raise JobError(
            422,
            "unknown_base_model",
            f"base_model: unknown base model {base_model!r}; GET /v1/base-models lists them",
            {"field": "base_model", "known": sorted(MODEL_SPECS)},
        )
    if not 0.0 <= validation_fraction < 1.0:
        raise JobError(
            422,
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
        raise JobError(422, "invalid_override", str(exc), {"field": where}) from None
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
    tenant_id: str | None = None,
    idempotency_key: str | None = None,
    now: datetime | None = None,
) -> tuple[Job, bool]:
    """Validate, plan, commit the queued job, then send it. Returns (job, created).

    `created` is False for an idempotent replay (same key, same body). A failed send is
    logged and leaves the job queued with no `enqueued_at`: the reconciler sends it later.
    """
    digest = request.fingerprint()
    if idempotency_key is not None:
        existing = _by_idempotency_key(session, tenant_id, idempotency_key)
        if existing is not None:
            return _replay(existing, digest), False

    dataset = session.get(Dataset, request.dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise JobError(404, "not_found", f"dataset {request.dataset_id!r} does not exist")
    if dataset.status != "ready":
        raise JobError(
            409, "dataset_not_ready", f"dataset {dataset.id} is {dataset.status}, not ready"
        )
    plan = plan_for_dataset(
        dataset, request.base_model, request.validation_fraction, request.overrides
    )
    now = now or utcnow()
    job = Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        dataset_id=dataset.id,
        base_model=request.base_model,
        name=request.name,
        status="queued",
        plan=plan,
        validation_fraction=request.validation_fraction,
        seed=request.seed,
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
            raise JobError(
                404, "not_found", f"dataset {request.dataset_id!r} does not exist"
            ) from None
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
        .where(Job.id == job_id, Job.status == "queued")
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
        raise JobError(
            409,
            "idempotency_conflict",
            "this Idempotency-Key was already used with a different request body; "
            "use a new key for a new job",
            {"job_id": existing.id},
        )
    return existing


def get_job(session: Session, job_id: str, tenant_id: str | None = None) -> Job:
    """The tenant's job, or JobError 404 (others' jobs look exactly like missing ones)."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.tenant_id != tenant_id:
        raise JobError(404, "not_found", f"job {job_id!r} does not exist")
    return job


def list_query(tenant_id: str | None = None, status: str | None = None) -> sa.Select[Job]:
    """The tenant's jobs, optionally of one status (paginate it with service.pagination)."""
    query = sa.select(Job).where(tenant_is(Job.tenant_id, tenant_id))
    if status is not None:
        if status not in JOB_STATES:
            raise JobError(
                422,
                "invalid_request",
                f"status must be one of {', '.join(JOB_STATES)}, got {status!r}",
                {"field": "status"},
            )
        query = query.where(Job.status == status)
    return query


def request_cancel(
    session: Session, job_id: str, tenant_id: str | None = None, now: datetime | None = None
) -> Job:
    """queued -> cancelled now; running -> cancelling (the worker stops between steps)."""
    now = now or utcnow()
    for _ in range(5):  # each turn loses at most one race with a worker transition
        job = get_job(session, job_id, tenant_id)
        if job.status == "cancelling":
            return job
        if job.status in FINISHED_STATES:
            raise JobError(409, "job_finished", f"job {job_id} already {job.status}")
        target = "cancelled" if job.status == "queued" else "cancelling"
        values: dict[str, Any] = {"status": target, "cancel_requested": True, "updated_at": now}
        if target == "cancelled":
            values["finished_at"] = now
        if cas(session, job_id, (job.status,), values):
            return get_job(session, job_id, tenant_id)
    raise JobError(409, "conflict", f"job {job_id} changed state repeatedly; try again")


def to_public(job: Job) -> dict[str, Any]:
    """The REST shape of a job (api.md, GET /v1/jobs/{id})."""
    progress = {
        "step": 0,
        "total_steps": int(job.plan.get("total_steps", 0)),
        "loss": None,
        "lr": None,
        "images_per_second": None,
        "eta_seconds": None,
        "phase": None,
    }
    progress.update(job.progress or {})
    error = None
    if job.error_code:
        error = {"code": job.error_code, "message": job.error_message or ""}
    return {
        "id": job.id,
        "name": job.name,
        "status": job.status,
        "dataset_id": job.dataset_id,
        "base_model": job.base_model,
        "validation_fraction": job.validation_fraction,
        "seed": job.seed,
        "overrides": job.overrides or {},
        "plan": job.plan,
        "progress": progress,
        "attempts": job.attempts,
        "error": error,
        "model_id": job.model_id,
        "metrics": job.metrics,
        "created_at": rfc3339(job.created_at),
        "started_at": rfc3339(job.started_at),
        "finished_at": rfc3339(job.finished_at),
    }


__all__ = [
    "ACTIVE_JOB_STATES",
    "FINISHED_STATES",
    "SEND_GRACE_SECONDS",
    "Claim",
    "JobError",
    "JobRequest",
    "Reconciled",
    "claim",
    "create_job",
    "enqueue",
    "finish_cancelled",
    "finish_failed",
    "finish_succeeded",
    "get_job",
    "heartbeat",
    "list_query",
    "plan_for_dataset",
    "reconcile",
    "record_progress",
    "release",
    "request_cancel",
    "to_public",
    "training_examples",
]
