"""/v1/datasets: upload, list, get, delete, and the HyperRule plan a dataset would get."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from bitcore.hyperrule import MAX_OVERRIDE
from service import dataset_sources, datasets, job_costs
from service.api_keys import Scope
from service.archive_uploads import is_json, parse_json, receive_dataset
from service.auth import authorize
from service.broker import Broker
from service.db import Database
from service.deps import (
    BrokerDep,
    DbDep,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    TenantDep,
)
from service.domain_errors import MalformedRequest
from service.http_errors import error_responses
from service.job_events import DatasetNotifier
from service.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, page
from service.plan_schemas import DatasetPlan, JobCost, Plan
from service.schemas import DatasetPublic, Page, RejectedFile
from service.settings import Settings

router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    dependencies=[authorize(Scope.TRAIN)],
    responses=error_responses(401, 403, 422),
)

UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "name": {"type": "string", "maxLength": datasets.MAX_NAME_LENGTH},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["source"],
                    "additionalProperties": False,
                    "properties": {
                        "source": {
                            "type": "string",
                            "maxLength": dataset_sources.MAX_SOURCE_CHARS,
                            "description": "s3://bucket/prefix/ holding <class>/<image> "
                            "folders, under a bucket the operator allowed",
                        },
                        "name": {"type": "string", "maxLength": datasets.MAX_NAME_LENGTH},
                    },
                }
            },
        },
    }
}


class SourceRequest(BaseModel):
    """POST /v1/datasets as JSON: register data that already lives in a bucket."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=dataset_sources.MAX_SOURCE_CHARS)
    name: str | None = Field(default=None, max_length=datasets.MAX_NAME_LENGTH)


@router.post(
    "",
    status_code=202,
    openapi_extra=UPLOAD_DOC,
    response_model=DatasetPublic,
    responses=error_responses(400, 413, 415, 422, 429, 503, 507),
)
async def upload_dataset(
    request: Request,
    response: Response,
    settings: SettingsDep,
    db: DbDep,
    storage: StorageDep,
    broker: BrokerDep,
    tenant: TenantDep,
) -> DatasetPublic:
    """A .zip or .tar.gz of `<class>/<image>` folders (the body is parsed as it streams).
    Answered 202 once the archive is stored: the dataset is `processing` while an ingest
    worker extracts and validates it (follow GET /v1/datasets/{id} or its /events), then
    `ready`, or `failed` with the error that refused the archive. A body larger than the
    tenant's remaining byte quota is refused (429) as soon as its Content-Length or its
    streamed bytes say so; past the uploads in progress per process, 503 `too_many_uploads`;
    without free disk for the body and a margin, 507.

    As JSON, `{"source": "s3://bucket/prefix/", "name": ...}` registers data already in a
    bucket the operator allowed (BITSERVE_DATASET_SOURCE_BUCKETS): the ingest worker copies
    it; any other source is 422 `source_not_allowed`."""
    if is_json(request):
        dataset = await _register(request, settings, db, broker, tenant)
    else:
        row, _ = await receive_dataset(request, settings, db, storage, broker, tenant)
        dataset = DatasetPublic.from_row(row)
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return dataset


async def _register(
    request: Request, settings: Settings, db: Database, broker: Broker, tenant: str
) -> DatasetPublic:
    body = await parse_json(request, SourceRequest)
    source = dataset_sources.parse_source(body.source, settings.dataset_source_buckets)
    fallback = source.prefix.rstrip("/").rsplit("/", 1)[-1] or source.bucket
    name = datasets.dataset_name(body.name, None, fallback)
    row = await run_in_threadpool(
        datasets.register_source, db, broker, settings, source, name=name, tenant_id=tenant
    )
    return DatasetPublic.from_row(row)


@router.get("", response_model=Page[DatasetPublic], responses=error_responses(400, 422))
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
) -> Page[DatasetPublic]:
    return page(session, datasets.list_datasets(tenant), limit, cursor, DatasetPublic.from_row)


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=error_responses(404))
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetPublic:
    return DatasetPublic.from_row(datasets.get_dataset(session, tenant, dataset_id))


EVENTS_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "Server-Sent Events until the dataset is ready or failed: `status` (data: a "
            "DatasetPublic) first and on every state change, `progress` (data: its "
            "IngestProgress plus its `id`) when it changes, and a final `done` (data: the "
            "finished DatasetPublic). A stream open for BITSERVE_STREAM_MAX_SECONDS ends with "
            "`reconnect` instead (data: the dataset `id`): open a new one; a dataset deleted "
            "meanwhile ends it with `deleted` (data: its `id`)."
        ),
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


@router.get(
    "/{dataset_id}/events",
    summary="Follow a dataset's ingestion (Server-Sent Events)",
    response_class=EventSourceResponse,
    responses={**EVENTS_DOC, **error_responses(404, 429)},
)
async def dataset_events(
    dataset_id: str, request: Request, db: DbDep, tenant: TenantDep, principal: PrincipalDep
) -> EventSourceResponse:
    """`status` first (the whole dataset), `progress` while it is ingested, and a final
    `done` once it is ready or failed; then the stream ends."""
    notifier: DatasetNotifier = request.app.state.dataset_events
    return await notifier.response(principal, lambda: _read_dataset(db, tenant, dataset_id))


def _read_dataset(db: Database, tenant: str | None, dataset_id: str) -> DatasetPublic:
    with db.sessionmaker() as session:
        return DatasetPublic.from_row(datasets.get_dataset(session, tenant, dataset_id))


@router.get(
    "/{dataset_id}/rejected",
    response_model=Page[RejectedFile],
    responses=error_responses(400, 404, 409, 503),
)
def list_rejected(
    dataset_id: str,
    session: SessionDep,
    storage: StorageDep,
    tenant: TenantDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
) -> Page[RejectedFile]:
    """Every member the upload skipped, with why, in path order (the dataset itself lists only
    the first ones, and the counts per reason)."""
    row = datasets.get_ready_dataset(session, tenant, dataset_id)
    offset = _decode_offset(cursor) if cursor else 0
    items, following = datasets.rejected_page(storage, row, offset, limit)
    return Page(
        items=[RejectedFile(**item) for item in items],
        next_cursor=_encode_offset(following) if following is not None else None,
    )


def _encode_offset(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps(["rejected", offset]).encode()).decode()


def _decode_offset(cursor: str) -> int:
    try:
        kind, offset = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if kind != "rejected" or not isinstance(offset, int) or offset < 0:
            raise ValueError(cursor)
        return offset
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise MalformedRequest(
            "invalid_cursor", "cursor is not one this API returned; start again without it"
        ) from None


@router.delete("/{dataset_id}", status_code=204, responses=error_responses(404, 409))
def delete_dataset(dataset_id: str, db: DbDep, storage: StorageDep, tenant: TenantDep) -> Response:
    datasets.delete_dataset(db, storage, tenant, dataset_id)
    return Response(status_code=204)


def _override(name: str, ge: int = 1) -> Any:
    # The same bounds as POST /v1/jobs (bitcore.hyperrule.MAX_OVERRIDE).
    return Query(ge=ge, le=MAX_OVERRIDE[name])


@router.get(
    "/{dataset_id}/plan", response_model=DatasetPlan, responses=error_responses(404, 409, 422)
)
def dataset_plan(
    dataset_id: str,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    base_model: Annotated[str, Query(max_length=64)] = "BiT-M-R50x1",
    validation_fraction: Annotated[float, Query(ge=0, lt=1)] = 0.1,
    steps: Annotated[int | None, _override("steps")] = None,
    warmup_steps: Annotated[int | None, _override("warmup_steps")] = None,
    batch_size: Annotated[int | None, _override("batch_size")] = None,
    micro_batch_size: Annotated[int | None, _override("micro_batch_size")] = None,
    base_lr: Annotated[float | None, Query(gt=0, le=MAX_OVERRIDE["base_lr"])] = None,
    crop: Annotated[int | None, _override("crop")] = None,
    precrop: Annotated[int | None, _override("precrop")] = None,
    mixup_alpha: Annotated[float | None, Query(ge=0, le=MAX_OVERRIDE["mixup_alpha"])] = None,
) -> DatasetPlan:
    """The plan a job on this dataset would get, its work and its cost; what POST /v1/jobs
    would refuse (bounds, invalid_override, job_too_expensive) is refused here alike."""
    row = datasets.get_ready_dataset(session, tenant, dataset_id)
    overrides = {
        "steps": steps,
        "warmup_steps": warmup_steps,
        "batch_size": batch_size,
        "micro_batch_size": micro_batch_size,
        "base_lr": base_lr,
        "crop": crop,
        "precrop": precrop,
        "mixup_alpha": mixup_alpha,
    }
    plan, estimate = datasets.plan_estimate(row, base_model, validation_fraction, overrides)
    cost = job_costs.check_cost(plan, base_model, row.num_images, settings, dataset_bytes=row.bytes)
    return DatasetPlan(
        dataset_id=row.id,
        base_model=base_model,
        validation_fraction=validation_fraction,
        plan=Plan.model_validate(plan),
        estimate=estimate,
        cost=JobCost(**cost.to_dict()),
    )
