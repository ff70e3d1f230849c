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

This module must stay importable by the worker: no FastAPI here (errors are `JobError`, which
the router maps to the API's error shape).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bitcore import hyperrule
from bitcore.models import MODEL_SPECS
from service.ids import new_id, rfc3339, utcnow
from service.settings import Settings
from service.tables import ACTIVE_JOB_STATES, JOB_STATES, Dataset, Job, Model

log = logging.getLogger(__name__)

FINISHED_STATES = ("succeeded", "failed", "cancelled")
# A job committed but not yet sent is the request handler's to send; the reconciler leaves
# it alone this long before assuming the send was lost (e.g. the gateway died in between).
SEND_GRACE_SECONDS = 10.0

Send = Callable[[str], None]


class JobError(Exception):
    """A refusal the client can act on: HTTP status, snake_case code, message, details."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


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
    total = 0
    for count in counts:
        k = math.floor(count * validation_fraction + 0.5)
        if validation_fraction > 0 and count >= 2:
            k = min(max(k, 1), count - 1)
        elif count < 2:
            k = 0
        total += count - k
    return total


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
        # A concurrent request with the same Idempotency-Key won the insert.
        session.rollback()
        existing = (
            _by_idempotency_key(session, tenant_id, idempotency_key) if idempotency_key else None
        )
        if existing is None:
            raise
        return _replay(existing, digest), False
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
    tenant = Job.tenant_id.is_(None) if tenant_id is None else Job.tenant_id == tenant_id
    return session.scalars(
        sa.select(Job).where(tenant, Job.idempotency_key == key).limit(1)
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
    tenant = Job.tenant_id.is_(None) if tenant_id is None else Job.tenant_id == tenant_id
    query = sa.select(Job).where(tenant)
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
        if _cas(session, job_id, (job.status,), values):
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


# ---------------------------------------------------------------------------------------------
# Worker side: every write is a compare-and-set on (status, worker_id)


@dataclass(frozen=True)
class Claim:
    claimed: bool
    reason: str  # "claimed", "too_many_attempts", "not_found", or the status that refused it
    job: Job | None = None


def claim(
    session: Session,
    job_id: str,
    worker_id: str,
    settings: Settings,
    now: datetime | None = None,
) -> Claim:
    """Take the job: queued (or running with a stale heartbeat) -> running, attempts + 1."""
    now = now or utcnow()
    stale = now - timedelta(seconds=settings.job_stale_after_seconds)
    takeable = sa.or_(
        Job.status == "queued",
        sa.and_(Job.status == "running", _stale(stale)),
    )
    result = session.execute(
        sa.update(Job)
        .where(Job.id == job_id, takeable, Job.attempts < settings.job_max_attempts)
        .values(
            status="running",
            attempts=Job.attempts + 1,
            worker_id=worker_id,
            heartbeat_at=now,
            started_at=sa.func.coalesce(Job.started_at, now),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return Claim(False, "not_found")
    if _rowcount(result) == 1:
        return Claim(True, "claimed", job)
    takeable_now = job.status == "queued" or (
        job.status == "running" and (job.heartbeat_at is None or job.heartbeat_at < stale)
    )
    if takeable_now and job.attempts >= settings.job_max_attempts:
        message = (
            f"job was started {job.attempts} times (limit {settings.job_max_attempts}) "
            "without finishing; its last worker probably crashed"
        )
        values = _failed_values("too_many_attempts", message, now)
        _cas(session, job_id, (job.status,), values)
        session.refresh(job)
        return Claim(False, "too_many_attempts", job)
    return Claim(False, job.status, job)


def heartbeat(session: Session, job_id: str, worker_id: str, now: datetime | None = None) -> str:
    """Refresh the heartbeat: "ok", "cancel" (cancel requested) or "lost" (not ours any more)."""
    now = now or utcnow()
    result = session.execute(
        sa.update(Job)
        .where(_owned(job_id, worker_id))
        .values(heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if _rowcount(result) == 0:
        return "lost"
    requested = session.scalar(sa.select(Job.cancel_requested).where(Job.id == job_id))
    return "cancel" if requested else "ok"


def record_progress(
    session: Session,
    job_id: str,
    worker_id: str,
    progress: Mapping[str, Any],
    now: datetime | None = None,
) -> bool:
    """Store the latest progress (callers throttle); False when the job is no longer ours."""
    now = now or utcnow()
    result = session.execute(
        sa.update(Job)
        .where(_owned(job_id, worker_id))
        .values(progress=dict(progress), heartbeat_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _rowcount(result) == 1


def finish_succeeded(
    session: Session,
    job_id: str,
    worker_id: str,
    *,
    model_id: str,
    storage_key: str,
    classes: list[str],
    input_spec: dict[str, Any],
    metrics: dict[str, Any],
    progress: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> Model | None:
    """Model row + job succeeded in ONE transaction; None if cancel was requested meanwhile
    (or the job is no longer ours): then the caller discards the artifact."""
    now = now or utcnow()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return None
    values: dict[str, Any] = {
        "status": "succeeded",
        "model_id": model_id,
        "metrics": metrics,
        "finished_at": now,
        "updated_at": now,
        "error_code": None,
        "error_message": None,
    }
    if progress is not None:
        values["progress"] = dict(progress)
    result = session.execute(
        sa.update(Job)
        .where(
            Job.id == job_id,
            Job.status == "running",
            Job.worker_id == worker_id,
            Job.cancel_requested.is_(False),
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if _rowcount(result) != 1:
        session.rollback()
        return None
    model = Model(
        id=model_id,
        tenant_id=job.tenant_id,
        job_id=job.id,
        base_model=job.base_model,
        name=job.name,
        classes=list(classes),
        plan=job.plan,
        metrics=metrics,
        input=input_spec,
        storage_key=storage_key,
        created_at=now,
    )
    session.add(model)
    session.commit()
    return model


def finish_failed(
    session: Session,
    job_id: str,
    worker_id: str | None,
    code: str,
    message: str,
    now: datetime | None = None,
) -> bool:
    """running/cancelling -> failed with an error; `worker_id` None skips the fence."""
    now = now or utcnow()
    where = [Job.id == job_id, Job.status.in_(("running", "cancelling"))]
    if worker_id is not None:
        where.append(Job.worker_id == worker_id)
    return _update(session, where, _failed_values(code, message, now))


def finish_cancelled(
    session: Session, job_id: str, worker_id: str | None, now: datetime | None = None
) -> bool:
    """running/cancelling -> cancelled (no model is kept)."""
    now = now or utcnow()
    where = [Job.id == job_id, Job.status.in_(("running", "cancelling"))]
    if worker_id is not None:
        where.append(Job.worker_id == worker_id)
    values = {
        "status": "cancelled",
        "cancel_requested": True,
        "finished_at": now,
        "updated_at": now,
    }
    return _update(session, where, values)


def release(session: Session, job_id: str, worker_id: str, now: datetime | None = None) -> bool:
    """running -> queued after an orderly worker shutdown (training checkpointed first).

    The attempt is handed back: a deploy or scale-down is not a crash, and must not push a
    job towards `job_max_attempts`. The caller sends the job again (or the reconciler does).
    A job whose cancel was requested is not released (it is the caller's to cancel).
    """
    now = now or utcnow()
    where = [
        Job.id == job_id,
        Job.worker_id == worker_id,
        Job.status == "running",
        Job.cancel_requested.is_(False),
    ]
    values = {
        "status": "queued",
        "attempts": sa.case((Job.attempts > 0, Job.attempts - 1), else_=0),
        "worker_id": None,
        "heartbeat_at": None,
        "enqueued_at": None,
        "updated_at": now,
    }
    return _update(session, where, values)


# ---------------------------------------------------------------------------------------------
# Reconciler


@dataclass
class Reconciled:
    resent: list[str] = field(default_factory=list)  # queued jobs sent again
    requeued: list[str] = field(default_factory=list)  # running, worker silent -> queued
    failed: list[str] = field(default_factory=list)  # worker silent, attempts exhausted
    cancelled: list[str] = field(default_factory=list)  # worker silent while cancelling

    def __bool__(self) -> bool:
        return bool(self.resent or self.requeued or self.failed or self.cancelled)


def reconcile(
    session: Session, settings: Settings, send: Send, now: datetime | None = None
) -> Reconciled:
    """Repair what the broker or a dead worker lost. Safe to run from several processes:
    every change is a compare-and-set, and a duplicate message is refused by `claim`."""
    now = now or utcnow()
    report = Reconciled()
    stale = now - timedelta(seconds=settings.job_stale_after_seconds)
    silent = session.execute(
        sa.select(Job.id, Job.status, Job.attempts, Job.cancel_requested).where(
            Job.status.in_(("running", "cancelling")), _stale(stale)
        )
    ).all()
    for job_id, status, attempts, cancel_requested in silent:
        where = [Job.id == job_id, Job.status == status, _stale(stale)]
        if status == "cancelling" or cancel_requested:
            values = {"status": "cancelled", "finished_at": now, "updated_at": now}
            if _update(session, where, values):
                report.cancelled.append(job_id)
        elif attempts >= settings.job_max_attempts:
            message = (
                f"the worker stopped answering (no heartbeat for "
                f"{settings.job_stale_after_seconds:g} s) on attempt {attempts} of "
                f"{settings.job_max_attempts}"
            )
            if _update(session, where, _failed_values("worker_lost", message, now)):
                report.failed.append(job_id)
        else:
            values = {
                "status": "queued",
                "worker_id": None,
                "heartbeat_at": None,
                "enqueued_at": None,
                "updated_at": now,
            }
            if _update(session, where, values):
                report.requeued.append(job_id)

    # Queued jobs whose message may be lost: never sent (after a grace period for the request
    # that is sending it right now), or sent long ago (e.g. Redis restarted without persistence).
    grace = now - timedelta(seconds=SEND_GRACE_SECONDS)
    resend_before = now - timedelta(seconds=settings.job_resend_after_seconds)
    unsent = sa.or_(
        sa.and_(Job.enqueued_at.is_(None), Job.updated_at < grace),
        Job.enqueued_at < resend_before,
    )
    due = [*report.requeued]
    due += session.scalars(
        sa.select(Job.id).where(Job.status == "queued", unsent).order_by(Job.created_at)
    ).all()
    for job_id in dict.fromkeys(due):
        # Take the turn with a compare-and-set, so two reconcilers do not both send.
        condition = [Job.id == job_id, Job.status == "queued"]
        if job_id not in report.requeued:
            condition.append(unsent)
        else:
            condition.append(Job.enqueued_at.is_(None))
        if not _update(session, condition, {"enqueued_at": now}):
            continue
        try:
            send(job_id)
        except Exception as exc:
            log.warning("reconciler could not send job %s: %s", job_id, exc)
            _update(session, [Job.id == job_id, Job.status == "queued"], {"enqueued_at": None})
            continue
        if job_id not in report.requeued:
            report.resent.append(job_id)
    return report


# ---------------------------------------------------------------------------------------------
# helpers


def _stale(before: datetime) -> sa.ColumnElement[bool]:
    return sa.or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < before)


def _owned(job_id: str, worker_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(
        Job.id == job_id, Job.worker_id == worker_id, Job.status.in_(("running", "cancelling"))
    )


def _failed_values(code: str, message: str, now: datetime) -> dict[str, Any]:
    return {
        "status": "failed",
        "error_code": code,
        "error_message": message[:4000],
        "finished_at": now,
        "updated_at": now,
    }


def _cas(session: Session, job_id: str, statuses: Sequence[str], values: dict[str, Any]) -> bool:
    return _update(session, [Job.id == job_id, Job.status.in_(statuses)], values)


def _update(session: Session, where: Sequence[Any], values: dict[str, Any]) -> bool:
    """One conditional UPDATE, committed; True when it changed the row."""
    result = session.execute(
        sa.update(Job).where(*where).values(**values).execution_options(synchronize_session=False)
    )
    session.commit()
    return _rowcount(result) == 1


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


__all__ = [
    "ACTIVE_JOB_STATES",
    "FINISHED_STATES",
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
