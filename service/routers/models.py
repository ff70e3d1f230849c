"""/v1/models: fine-tuned models (list, get, delete, download) and prediction.

Thin: parse, look up the tenant's model, call service.models_store / service.serving, answer
a service.schemas model. The predict body is read by service.request_bodies, under a byte cap
enforced while it streams (FastAPI's own form parsing would accept any size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from bitcore.artifacts import ArtifactError
from bitcore.export import ExportError, ensure_onnx
from service import models_store as store
from service.admission import PredictAdmission
from service.api_keys import Scope
from service.auth import authorize
from service.db import Database
from service.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from service.domain_errors import InvalidRequest, Unavailable
from service.http_errors import error_responses
from service.known_models import KnownModels
from service.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, page
from service.predict_calls import (
    declared_bytes,
    image_predictions,
    limit_predict_rate,
    predict_images,
)
from service.request_bodies import FILES_FIELD, read_images
from service.schemas import ModelPublic, Page, PredictResponse
from service.serving import ModelCache
from service.settings import Settings

router = APIRouter(prefix="/v1/models", tags=["models"], responses=error_responses(401, 403, 422))
READ = [authorize(Scope.PREDICT, Scope.TRAIN)]  # list and read: either scope
# The key first (it names the bucket), then its rate.
PREDICT = [authorize(Scope.PREDICT), Depends(limit_predict_rate)]
TRAIN = [authorize(Scope.TRAIN)]  # delete and download

PREDICT_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        FILES_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        }
                    },
                    "required": [FILES_FIELD],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "instances": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"image_b64": {"type": "string"}},
                                "required": ["image_b64"],
                            },
                        }
                    },
                    "required": ["instances"],
                }
            },
        },
    }
}


ARTIFACT_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "format=safetensors: the model's weights (safetensors) and "
        "metadata.json, as a .zip (plus model.int8.onnx when the model is served in int8); "
        "format=onnx: the ONNX graph (WS folded, dynamic batch, "
        "input and preprocessing in its metadata_props)",
        "content": {
            "application/zip": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
ArtifactFormat = Literal["safetensors", "onnx"]


@router.get("", response_model=Page[ModelPublic], dependencies=READ, responses=error_responses(400))
def list_models(
    session: SessionDep,
    tenant: TenantDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
) -> Page[ModelPublic]:
    return page(session, store.list_models(tenant), limit, cursor, ModelPublic.from_row)


@router.get(
    "/{model_id}", response_model=ModelPublic, dependencies=READ, responses=error_responses(404)
)
def get_model(model_id: str, session: SessionDep, tenant: TenantDep) -> ModelPublic:
    return ModelPublic.from_row(store.get_model(session, tenant, model_id))


@router.delete(
    "/{model_id}", status_code=204, dependencies=TRAIN, responses=error_responses(404, 409)
)
async def delete_model(
    model_id: str, request: Request, session: SessionDep, storage: StorageDep, tenant: TenantDep
) -> Response:
    """The model, its artifact, evaluations and batch predictions; 409 `model_in_use` while
    a deployment uses it (as a target or its shadow), naming the deployments."""
    try:
        await run_in_threadpool(store.delete_model, session, storage, tenant, model_id)
    finally:  # also when it failed half-way: the next predict reads the row again
        request.app.state.known_models.forget(model_id)
    _cache(request).evict(model_id)
    return Response(status_code=204)


@router.get(
    "/{model_id}/artifact",
    response_class=StreamingResponse,
    dependencies=TRAIN,
    responses={**ARTIFACT_DOC, **error_responses(404, 410, 422, 503)},
)
def download_artifact(
    model_id: str,
    session: SessionDep,
    storage: StorageDep,
    tenant: TenantDep,
    format: Annotated[
        ArtifactFormat, Query(description="safetensors (.zip, the default) or onnx (.onnx)")
    ] = "safetensors",
) -> Response:
    store.get_model(session, tenant, model_id)
    files = store.artifact_files(storage, model_id)
    if format == "onnx":
        return FileResponse(
            _onnx_file(files[0].parent, model_id),
            media_type="application/octet-stream",
            filename=f"{model_id}.onnx",
        )
    return StreamingResponse(
        store.iter_artifact_zip(files),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{model_id}.zip"'},
    )


def _onnx_file(directory: Path, model_id: str) -> Path:
    """The model's export, made on the first request and kept in its local folder (a sync
    route: this runs in the thread pool, not on the event loop)."""
    try:
        return ensure_onnx(directory)
    except ExportError as exc:  # over ONNX's 2 GiB
        raise InvalidRequest("onnx_unsupported", str(exc), {"model_id": model_id}) from exc
    except ArtifactError as exc:  # the weights fail their checksum: nothing to export
        raise Unavailable(
            "model_artifact_corrupt",
            f"the artifact of model {model_id} on the server is damaged: it cannot be exported",
            {"model_id": model_id},
            retry_after=60,
        ) from exc


@router.post(
    "/{model_id}/predict",
    openapi_extra=PREDICT_BODY_DOC,
    response_model=PredictResponse,
    dependencies=PREDICT,
    responses=error_responses(400, 404, 413, 415, 429, 503),
)
async def predict(
    model_id: str,
    request: Request,
    settings: SettingsDep,
    tenant: TenantDep,
    top_k: Annotated[int, Query(ge=1, description="labels per image (clamped to classes)")] = 5,
) -> PredictResponse:
    """Classify one or many images: multipart `files`, or JSON {"instances":[{"image_b64"}]}."""
    await _check_model(request, tenant, model_id)
    # Admitted before a byte of the body is read: a busy server answers 503 at once.
    admission: PredictAdmission = request.app.state.predict_admission
    with admission.admit(declared_bytes(request, settings)):
        return await _predict(model_id, request, settings, top_k)


async def _check_model(request: Request, tenant: str, model_id: str) -> None:
    """NotFound unless the tenant owns the model: from the database, unless it was found there
    in the last few seconds by this process (service.known_models). No request session: a
    cache hit needs no database connection and no thread-pool hop."""
    known: KnownModels = request.app.state.known_models
    if known.known(tenant, model_id):
        return
    generation = known.generation
    db: Database = request.app.state.db
    await run_in_threadpool(_find_model, db, tenant, model_id)
    known.remember(tenant, model_id, generation)


def _find_model(db: Database, tenant: str, model_id: str) -> None:
    with db.sessionmaker() as session:
        store.get_model(session, tenant, model_id)


async def _predict(
    model_id: str, request: Request, settings: Settings, top_k: int
) -> PredictResponse:
    names, images = await read_images(request, settings)
    results = await predict_images(_cache(request), model_id, names, images, top_k)
    return PredictResponse(model_id=model_id, predictions=image_predictions(results))


def _cache(request: Request) -> ModelCache:
    cache: ModelCache = request.app.state.models
    return cache
