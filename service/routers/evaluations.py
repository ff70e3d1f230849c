"""Evaluations: score a model on a labelled dataset (run by a worker), read the results and the
worst examples' thumbnails. Thin: parse, call service.evaluations, answer a schema."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from service import evaluations, models_store
from service.api_keys import Scope
from service.archive_uploads import archive_or_json_body, is_json, parse_json, receive_dataset
from service.auth import authorize
from service.datasets import MAX_NAME_LENGTH
from service.deps import BrokerDep, DbDep, SessionDep, SettingsDep, StorageDep, TenantDep
from service.http_errors import error_responses
from service.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, page
from service.schemas import Page
from service.scoring_schemas import EvaluationPublic

router = APIRouter(tags=["evaluations"], responses=error_responses(401, 403, 422))
READ = [authorize(Scope.PREDICT, Scope.TRAIN)]  # as reading a model
TRAIN = [authorize(Scope.TRAIN)]  # it runs on the training workers
T = TypeVar("T")

THUMBNAIL_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The example's thumbnail (JPEG, longest side 128 px)",
        "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
    }
}


class EvaluationCreate(BaseModel):
    """POST /v1/models/{id}/evaluations: the labelled dataset to score the model on (uploaded
    as any dataset; its class folders must be named like the model's classes)."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(min_length=1, max_length=64)


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await run_in_threadpool(fn, *args, **kwargs)


EVALUATION_BODY_DOC = archive_or_json_body(
    "EvaluationCreate", {"name": {"type": "string", "maxLength": MAX_NAME_LENGTH}}
)


@router.post(
    "/v1/models/{model_id}/evaluations",
    status_code=202,
    summary="Score a model on a labelled dataset (a stored one, or an archive sent here)",
    response_model=EvaluationPublic,
    dependencies=TRAIN,
    openapi_extra=EVALUATION_BODY_DOC,
    responses=error_responses(400, 404, 409, 413, 415, 429, 503, 507),
)
async def create_evaluation(
    model_id: str,
    request: Request,
    settings: SettingsDep,
    db: DbDep,
    storage: StorageDep,
    session: SessionDep,
    tenant: TenantDep,
    broker: BrokerDep,
) -> EvaluationPublic:
    """Queued at once; a worker scores every image of the dataset with the model as served
    (the same runtime and precision) and stores accuracy, macro-F1, per-class precision /
    recall / F1, the confusion matrix, top-k accuracy, the most confused pairs and the
    worst-scored examples. A dataset still processing is waited for. 422 `unknown_labels`
    when the dataset has classes the model does not know.

    JSON `{"dataset_id"}` names a stored dataset; multipart/form-data with a `file` part (a
    .zip or .tar.gz of `<class>/<image>` folders, as POST /v1/datasets takes) stores it as a
    new dataset first (listed with the others, its id in `dataset_id`; its classes are checked
    once it is ingested)."""
    if is_json(request):
        body = await parse_json(request, EvaluationCreate)
        dataset_id = body.dataset_id
    else:
        await _call(models_store.get_model, session, tenant, model_id)  # 404 before the bytes
        dataset, _ = await receive_dataset(request, settings, db, storage, broker, tenant)
        dataset_id = dataset.id
    row = await _call(
        evaluations.create_evaluation,
        session,
        tenant,
        model_id,
        dataset_id,
        broker.send_evaluate,
    )
    return EvaluationPublic.from_row(row)


@router.get(
    "/v1/models/{model_id}/evaluations",
    summary="A model's evaluations, newest first (its validation result is the oldest)",
    response_model=Page[EvaluationPublic],
    dependencies=READ,
    responses=error_responses(400, 404),
)
async def list_evaluations(
    model_id: str,
    session: SessionDep,
    tenant: TenantDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
) -> Page[EvaluationPublic]:
    await _call(models_store.get_model, session, tenant, model_id)  # 404 before an empty page
    query = evaluations.list_evaluations(tenant, model_id)
    return await _call(page, session, query, limit, cursor, EvaluationPublic.from_row)


@router.get(
    "/v1/evaluations/{evaluation_id}",
    summary="An evaluation: status, progress, result",
    response_model=EvaluationPublic,
    dependencies=READ,
    responses=error_responses(404),
)
async def get_evaluation(
    evaluation_id: str, session: SessionDep, tenant: TenantDep
) -> EvaluationPublic:
    row = await _call(evaluations.get_evaluation, session, tenant, evaluation_id)
    return EvaluationPublic.from_row(row)


@router.get(
    "/v1/evaluations/{evaluation_id}/examples/{index}",
    summary="The thumbnail of one of an evaluation's worst-scored examples",
    response_class=Response,
    dependencies=READ,
    responses={**THUMBNAIL_DOC, **error_responses(404)},
)
async def example_thumbnail(
    evaluation_id: str,
    index: Annotated[int, Path(ge=0, le=999)],
    session: SessionDep,
    storage: StorageDep,
    tenant: TenantDep,
) -> Response:
    data = await _call(
        evaluations.example_thumbnail, session, storage, tenant, evaluation_id, index
    )
    return Response(
        data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"}
    )
