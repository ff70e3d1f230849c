"""/v1/jobs: create, read, list, cancel and follow (Server-Sent Events) fine-tuning jobs.

Thin: parse, call service.jobs, answer a service.schemas model. Database work runs in the
thread pool (sync SQLAlchemy), never on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from bitcore.train.history import TrainingHistory
from service import jobs
from service.api_keys import Scope
from service.auth import authorize
from service.db import Database
from service.deployments import NAME_PATTERN
from service.deps import BrokerDep, DbDep, PrincipalDep, SessionDep, SettingsDep, TenantDep
from service.http_errors import error_responses
from service.job_events import JobNotifier
from service.job_states import JobStatus
from service.names import NameStr
from service.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, page
from service.plan_schemas import OverridesRequest
from service.schemas import JobMetricsPublic, JobPublic, Page

router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    dependencies=[authorize(Scope.TRAIN)],
    responses=error_responses(401, 403, 422),
)
T = TypeVar("T")

EVENTS_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "Server-Sent Events until the job ends: `status` (data: a JobPublic) first and on "
            "every state change, `progress` (data: the job's Progress plus its `id`) when it "
            "changes, and a final `done` (data: the finished JobPublic). A stream open for "
            "BITSERVE_STREAM_MAX_SECONDS ends with `reconnect` instead (data: the job `id`): "
            "open a new one."
        ),
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


class JobCreate(BaseModel):
    """POST /v1/jobs body. Each override is typed and bounded here (422 invalid_request, the
    field named); how they fit together is the BiT-HyperRule planner's to check (422
    invalid_override), and what the job costs the server's (422 job_too_expensive)."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(min_length=1, max_length=64)
    base_model: str = Field(default="BiT-M-R50x1", min_length=1, max_length=64)
    # strict: `false` is not a fraction of 0, nor `true` seed 1 (found by tests/fuzz).
    validation_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, strict=True)
    seed: int = Field(default=0, ge=0, le=2**31 - 1, strict=True)
    serving_precision: Literal["fp32", "int8"] = Field(
        default="fp32",
        description=(
            "int8: after training, quantize the model and serve it in int8 only if its top-1 "
            "answers agree with float32 on at least 99.5% of the validation split "
            "(metrics.precision of the model says what was measured); otherwise float32"
        ),
    )
    overrides: OverridesRequest = Field(default_factory=lambda: OverridesRequest.model_validate({}))
    name: NameStr | None = Field(default=None, max_length=200)
    deploy_to: str | None = Field(
        default=None,
        max_length=63,
        pattern=NAME_PATTERN,
        description=(
            "a deployment to point at the new model when the job succeeds (made if the tenant "
            "has none of that name); job.deployment says what happened"
        ),
    )
    deploy_if_better: bool = Field(
        default=False,
        strict=True,
        description=(
            "with deploy_to: only if the new model's accuracy on the job's validation split "
            "beats the deployment's current target's on the same images (both as served)"
        ),
    )


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    # Database work off the event loop; a service.domain_errors error answers as it is.
    return await run_in_threadpool(fn, *args, **kwargs)


@router.post(
    "",
    status_code=202,
    summary="Start a fine-tuning job",
    response_model=JobPublic,
    responses={
        200: {"model": JobPublic, "description": "A replay: this Idempotency-Key's job"},
        **error_responses(400, 404, 409, 422, 429),  # 400: an unparseable JSON body
    },
)
async def create_job(
    body: JobCreate,
    session: SessionDep,
    tenant: TenantDep,
    broker: BrokerDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    # Only the overrides given: the fingerprint (idempotent replays) is of what was asked.
    overrides = body.overrides.model_dump(exclude_none=True)
    request = jobs.JobRequest(**{**body.model_dump(), "overrides": overrides})
    job, created = await _call(
        jobs.create_job,
        session,
        request,
        send=broker.send_finetune,
        settings=settings,
        tenant_id=tenant,
        idempotency_key=idempotency_key,
    )
    public = JobPublic.from_row(job).model_dump(mode="json")
    return JSONResponse(public, status_code=202 if created else 200)


@router.get(
    "",
    summary="List jobs, newest first",
    response_model=Page[JobPublic],
    responses=error_responses(400, 422),
)
async def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status: Annotated[JobStatus | None, Query(description="only jobs in this state")] = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
) -> Page[JobPublic]:
    query = jobs.list_jobs(tenant, status)
    return await _call(page, session, query, limit, cursor, JobPublic.from_row)


@router.get(
    "/{job_id}",
    summary="A job: status, plan, progress, result",
    response_model=JobPublic,
    responses=error_responses(404),
)
async def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    return JobPublic.from_row(await _call(jobs.get_job, session, tenant, job_id))


METRICS_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "The job's curves. JSON by default; with `Accept: text/csv`, one row per step "
            "that has a training or a validation point: "
            "`step,loss,lr,images_per_second,val_accuracy,val_loss` (empty cells: no value)."
        ),
        "content": {"text/csv": {"schema": {"type": "string"}}},
    }
}


@router.get(
    "/{job_id}/metrics",
    summary="A job's training curves: loss, learning rate, speed, validation",
    response_model=JobMetricsPublic,
    responses={**METRICS_DOC, **error_responses(404)},
)
async def job_metrics(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    job, history = await _call(jobs.get_job_history, session, tenant, job_id)
    public = JobMetricsPublic.from_row(job, history)
    if wants_csv(accept):
        curves = TrainingHistory.from_dict(public.model_dump(include={"training", "validation"}))
        return Response(
            curves.to_csv(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{job.id}-metrics.csv"'},
        )
    return JSONResponse(public.model_dump(mode="json"))


def wants_csv(accept: str | None) -> bool:
    """text/csv asked for, and preferred to JSON when both are listed (no q-values: the
    first one named wins, as the page and curl send one type)."""
    if not accept:
        return False
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    csv_at = types.index("text/csv") if "text/csv" in types else None
    json_at = types.index("application/json") if "application/json" in types else None
    return csv_at is not None and (json_at is None or csv_at < json_at)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    summary="Cancel a job",
    response_model=JobPublic,
    responses=error_responses(404, 409),
)
async def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    return JobPublic.from_row(await _call(jobs.request_cancel, session, tenant, job_id))


@router.get(
    "/{job_id}/events",
    summary="Follow a job (Server-Sent Events)",
    response_class=EventSourceResponse,
    responses={**EVENTS_DOC, **error_responses(404, 429)},
)
async def job_events(
    job_id: str, request: Request, db: DbDep, tenant: TenantDep, principal: PrincipalDep
) -> EventSourceResponse:
    """`status` on every state change (and first, with the whole job), `progress` when the
    progress changes, and a final `done` with the finished job; then the stream ends. A stream
    open for BITSERVE_STREAM_MAX_SECONDS ends with `reconnect` instead (open a new one)."""
    notifier: JobNotifier = request.app.state.job_events
    return await notifier.response(principal, lambda: _read_job(db, tenant, job_id))


def _read_job(db: Database, tenant: str | None, job_id: str) -> JobPublic:
    with db.sessionmaker() as session:
        return JobPublic.from_row(jobs.get_job(session, tenant, job_id))
