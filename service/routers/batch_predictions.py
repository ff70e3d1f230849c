"""Batch predictions: a model's top-k labels for every file of a dataset, run by a worker as a
job (progress, cancel), downloaded as one CSV or JSONL file. Thin: parse, call
service.batch_predictions, answer a schema."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from service import batch_predictions, models_store
from service.api_keys import Scope
from service.archive_uploads import (
    archive_or_json_body,
    is_json,
    parse_fields,
    parse_json,
    receive_dataset,
)
from service.auth import authorize
from service.datasets import MAX_NAME_LENGTH
from service.deps import BrokerDep, DbDep, SessionDep, SettingsDep, StorageDep, TenantDep
from service.http_errors import error_responses
from service.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, page
from service.schemas import Page
from service.scoring_schemas import BatchPredictionPublic

router = APIRouter(tags=["batch predictions"], responses=error_responses(401, 403, 422))
READ = [authorize(Scope.PREDICT, Scope.TRAIN)]  # as reading a model
TRAIN = [authorize(Scope.TRAIN)]  # it runs on the training workers
T = TypeVar("T")

OUTPUT_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "The output file (Content-Disposition: attachment): CSV with the header "
            "`file,label_1,score_1,...,label_k,score_k,error`, or JSON lines "
            '`{"file", "predictions": [{"label", "score"}], "error"?}`; one row per file of '
            "the dataset, sorted by path"
        ),
        "content": {
            "text/csv": {"schema": {"type": "string"}},
            "application/x-ndjson": {"schema": {"type": "string"}},
        },
    }
}


class BatchPredictionOptions(BaseModel):
    """Labels per file and the output's format: the JSON body's fields beside `dataset_id`,
    or the form fields beside an archive's `file` part."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(
        batch_predictions.DEFAULT_TOP_K,
        ge=1,
        le=batch_predictions.MAX_TOP_K,
        strict=True,  # `true` is not 1 label
        description="labels per file, highest score first (clamped to the model's classes)",
    )
    format: Literal["csv", "jsonl"] = "csv"


class BatchPredictionCreate(BatchPredictionOptions):
    """POST /v1/models/{id}/batch-predictions: the dataset whose files to predict (uploaded as
    any dataset; its class folders are ignored), labels per file, and the output's format."""

    dataset_id: str = Field(min_length=1, max_length=64)


def _options(fields: dict[str, str]) -> BatchPredictionOptions:
    options = {key: value for key, value in fields.items() if key != "name"}
    return parse_fields(options, BatchPredictionOptions)


BATCH_BODY_DOC = archive_or_json_body(
    "BatchPredictionCreate",
    {
        "name": {"type": "string", "maxLength": MAX_NAME_LENGTH},
        "top_k": {
            "type": "integer",
            "minimum": 1,
            "maximum": batch_predictions.MAX_TOP_K,
            "default": batch_predictions.DEFAULT_TOP_K,
        },
        "format": {"type": "string", "enum": ["csv", "jsonl"], "default": "csv"},
    },
)


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await run_in_threadpool(fn, *args, **kwargs)


@router.post(
    "/v1/models/{model_id}/batch-predictions",
    status_code=202,
    summary="Predict every file of a dataset (a stored one, or an archive sent here) into "
    "one CSV or JSONL file",
    response_model=BatchPredictionPublic,
    dependencies=TRAIN,
    openapi_extra=BATCH_BODY_DOC,
    responses=error_responses(400, 404, 409, 413, 415, 429, 503, 507),
)
async def create_batch_prediction(
    model_id: str,
    request: Request,
    settings: SettingsDep,
    db: DbDep,
    storage: StorageDep,
    session: SessionDep,
    tenant: TenantDep,
    broker: BrokerDep,
) -> BatchPredictionPublic:
    """Queued at once; a worker predicts every file of the dataset with the model as served
    (the same decoding, runtime and precision as `POST /v1/models/{id}/predict`), shard by
    shard, and writes one row per file. A dataset still processing is waited for. Follow it
    with `GET /v1/batch-predictions/{id}`, download `.../output` once it succeeded.

    JSON `{"dataset_id", "top_k", "format"}` names a stored dataset; multipart/form-data with a
    `file` part (a .zip or .tar.gz laid out as a dataset: `<folder>/<image>`, the folders'
    names unused) and `top_k` / `format` fields stores it as a new dataset first (listed with
    the others, its id in `dataset_id`)."""
    options: BatchPredictionOptions
    if is_json(request):
        body = await parse_json(request, BatchPredictionCreate)
        dataset_id, options = body.dataset_id, body
    else:
        await _call(models_store.get_model, session, tenant, model_id)  # 404 before the bytes
        dataset, checked = await receive_dataset(
            request,
            settings,
            db,
            storage,
            broker,
            tenant,
            fields=frozenset({"name", "top_k", "format"}),
            check_fields=_options,
        )
        assert checked is not None
        dataset_id, options = dataset.id, checked
    row = await _call(
        batch_predictions.create_batch_prediction,
        session,
        tenant,
        model_id,
        dataset_id,
        options.top_k,
        options.format,
        broker.send_batch_predict,
    )
    return BatchPredictionPublic.from_row(row)


@router.get(
    "/v1/models/{model_id}/batch-predictions",
    summary="A model's batch predictions, newest first",
    response_model=Page[BatchPredictionPublic],
    dependencies=READ,
    responses=error_responses(400, 404),
)
async def list_batch_predictions(
    model_id: str,
    session: SessionDep,
    tenant: TenantDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
) -> Page[BatchPredictionPublic]:
    await _call(models_store.get_model, session, tenant, model_id)  # 404 before an empty page
    query = batch_predictions.list_batch_predictions(tenant, model_id)
    return await _call(page, session, query, limit, cursor, BatchPredictionPublic.from_row)


@router.get(
    "/v1/batch-predictions/{batch_prediction_id}",
    summary="A batch prediction: status, progress, result",
    response_model=BatchPredictionPublic,
    dependencies=READ,
    responses=error_responses(404),
)
async def get_batch_prediction(
    batch_prediction_id: str, session: SessionDep, tenant: TenantDep
) -> BatchPredictionPublic:
    row = await _call(batch_predictions.get_batch_prediction, session, tenant, batch_prediction_id)
    return BatchPredictionPublic.from_row(row)


@router.post(
    "/v1/batch-predictions/{batch_prediction_id}/cancel",
    summary="Cancel a batch prediction (a running one stops after its current shard)",
    response_model=BatchPredictionPublic,
    dependencies=TRAIN,
    responses=error_responses(404, 409),
)
async def cancel_batch_prediction(
    batch_prediction_id: str, session: SessionDep, tenant: TenantDep
) -> BatchPredictionPublic:
    """queued: cancelled at once; running: `cancelling` until its worker stops (then
    `cancelled`, its files deleted); 409 `batch_prediction_finished` once it ended."""
    row = await _call(batch_predictions.request_cancel, session, tenant, batch_prediction_id)
    return BatchPredictionPublic.from_row(row)


@router.get(
    "/v1/batch-predictions/{batch_prediction_id}/output",
    summary="Download a batch prediction's output file",
    response_class=FileResponse,
    dependencies=READ,
    responses={**OUTPUT_DOC, **error_responses(404, 409, 410, 503)},
)
def download_output(
    batch_prediction_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep
) -> FileResponse:
    """409 `not_finished` until it succeeded; 410 `output_missing` if the file is gone."""
    found = batch_predictions.output(session, storage, tenant, batch_prediction_id)
    return FileResponse(found.path, media_type=found.media_type, filename=found.filename)
