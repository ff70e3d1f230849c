"""/v1/models: fine-tuned models (list, get, delete, download) and prediction.

Thin: parse, look up the tenant's model, call service.models_store / service.serving, map the
result. The predict body is read here, under a byte cap enforced while streaming (chunked
bodies too), because FastAPI's own form parsing would accept any size.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from bitcore.predict import InputImageError
from service import models_store as store
from service.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from service.errors import ApiError, not_found
from service.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, paginate
from service.serving import ModelCache, ModelUnavailable, Overloaded
from service.settings import Settings

router = APIRouter(prefix="/v1/models", tags=["models"])

FILES_FIELD = "files"


class Label(BaseModel):
    label: str
    score: float


class ImagePrediction(BaseModel):
    top_k: list[Label]


class PredictResponse(BaseModel):
    model_id: str
    predictions: list[ImagePrediction]


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


@router.get("")
def list_models(
    session: SessionDep,
    tenant: TenantDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
) -> dict[str, Any]:
    rows, next_cursor = paginate(session, store.list_models_query(tenant), limit, cursor)
    return {"items": [store.model_to_api(row) for row in rows], "next_cursor": next_cursor}


@router.get("/{model_id}")
def get_model(model_id: str, session: SessionDep, tenant: TenantDep) -> dict[str, Any]:
    row = store.get_model(session, tenant, model_id)
    if row is None:
        raise not_found("model", model_id)
    return store.model_to_api(row)


@router.delete("/{model_id}", status_code=204)
async def delete_model(
    model_id: str, request: Request, session: SessionDep, storage: StorageDep, tenant: TenantDep
) -> Response:
    deleted = await run_in_threadpool(store.delete_model, session, storage, tenant, model_id)
    if not deleted:
        raise not_found("model", model_id)
    _cache(request).evict(model_id)
    return Response(status_code=204)


@router.get(
    "/{model_id}/artifact",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {}}, "description": "weights + metadata"}},
)
def download_artifact(
    model_id: str, session: SessionDep, storage: StorageDep, tenant: TenantDep
) -> StreamingResponse:
    if store.get_model(session, tenant, model_id) is None:
        raise not_found("model", model_id)
    try:
        files = store.artifact_files(storage, model_id)
    except FileNotFoundError as exc:
        raise ApiError(410, "artifact_missing", f"{exc}; the model cannot be downloaded") from exc
    return StreamingResponse(
        store.iter_artifact_zip(files),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{model_id}.zip"'},
    )


@router.post("/{model_id}/predict", openapi_extra=PREDICT_BODY_DOC)
async def predict(
    model_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    top_k: Annotated[int, Query(ge=1, description="labels per image (clamped to classes)")] = 5,
) -> PredictResponse:
    """Classify one or many images: multipart `files`, or JSON {"instances":[{"image_b64"}]}."""
    row = await run_in_threadpool(store.get_model, session, tenant, model_id)
    if row is None:
        raise not_found("model", model_id)
    names, images = await read_images(request, settings)
    try:
        results = await _cache(request).predict(model_id, images, top_k)
    except InputImageError as exc:
        name = names[exc.index]
        cause = str(exc.__cause__ or exc)
        raise ApiError(
            422,
            "invalid_image",
            f"image {exc.index} ({name}) cannot be used: {cause}",
            {"index": exc.index, "filename": name, "reason": exc.reason},
        ) from exc
    except Overloaded as exc:
        raise ApiError(
            503,
            "overloaded",
            f"the server is busy ({exc}); retry later",
            {"waiting": exc.waiting, "limit": exc.limit},
            headers={"Retry-After": str(exc.retry_after)},
        ) from exc
    except ModelUnavailable as exc:
        raise ApiError(503, "model_unavailable", str(exc)) from exc
    return PredictResponse(
        model_id=model_id,
        predictions=[
            ImagePrediction(top_k=[Label(label=label, score=score) for label, score in ranked])
            for ranked in results
        ],
    )


# -- reading the predict body ----------------------------------------------------------------


async def read_images(request: Request, settings: Settings) -> tuple[list[str], list[bytes]]:
    """(names, contents) of the request's images, in order; names are filenames or "#i"."""
    limit = int(settings.predict_max_request_bytes)
    # A request larger than the whole queue could never be admitted: "too many", not "busy".
    max_images = min(int(settings.predict_max_images_per_request), int(settings.predict_max_queue))
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type == "multipart/form-data":
        names, images = await _read_multipart(request, limit, max_images)
    elif content_type == "application/json" or content_type.endswith("+json"):
        names, images = await _read_json(request, limit, max_images)
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send images as multipart/form-data (field {FILES_FIELD!r}) or as application/json "
            '{"instances": [{"image_b64": "..."}]}; got ' + repr(content_type or "no type"),
        )
    if not images:
        raise ApiError(422, "no_images", f"no images: add one or more {FILES_FIELD!r} parts")
    if len(images) > max_images:
        raise _too_many(len(images), max_images)
    return names, images


async def _read_multipart(
    request: Request, limit: int, max_images: int
) -> tuple[list[str], list[bytes]]:
    parser = MultiPartParser(
        request.headers,
        _capped(request.stream(), limit),
        max_files=max_images + 1,  # one over, so "too many" is ours to report
        max_fields=16,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise _too_many(max_images + 1, max_images) from exc
        raise ApiError(400, "malformed_request", f"bad multipart body: {exc.message}") from exc
    names: list[str] = []
    images: list[bytes] = []
    try:
        for key, value in form.multi_items():
            if not isinstance(value, UploadFile):
                continue
            if key != FILES_FIELD:
                raise ApiError(
                    422,
                    "invalid_request",
                    f"unexpected file field {key!r}: send images in {FILES_FIELD!r} parts",
                )
            names.append(value.filename or f"#{len(images)}")
            images.append(await value.read())
    finally:
        await form.close()
    return names, images


async def _read_json(
    request: Request, limit: int, max_images: int
) -> tuple[list[str], list[bytes]]:
    body = b"".join([chunk async for chunk in _capped(request.stream(), limit)])
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed_request", f"the body is not valid JSON: {exc}") from exc
    instances = payload.get("instances") if isinstance(payload, dict) else None
    if not isinstance(instances, list):
        raise ApiError(
            422, "invalid_request", 'expected {"instances": [{"image_b64": "..."}, ...]}'
        )
    if len(instances) > max_images:
        raise _too_many(len(instances), max_images)
    names: list[str] = []
    images: list[bytes] = []
    for index, instance in enumerate(instances):
        encoded = instance.get("image_b64") if isinstance(instance, dict) else None
        if not isinstance(encoded, str):
            raise ApiError(
                422,
                "invalid_request",
                f"instances[{index}] must be an object with a string image_b64",
                {"index": index},
            )
        names.append(f"instances[{index}]")
        images.append(_decode_b64(encoded, index))
    return names, images


def _decode_b64(encoded: str, index: int) -> bytes:
    # A data URL ("data:image/png;base64,....") is accepted too; its declared type is ignored
    # (magic bytes decide), as is whitespace from line-wrapped encoders.
    if encoded.startswith("data:") and "," in encoded:
        encoded = encoded.split(",", 1)[1]
    try:
        return base64.b64decode("".join(encoded.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(
            422,
            "invalid_base64",
            f"instances[{index}].image_b64 is not valid base64: {exc}",
            {"index": index},
        ) from exc


async def _capped(stream: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    """The body, failing with 413 as soon as more than `limit` bytes have arrived."""
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        yield chunk


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "request_too_large",
        f"the request body is over {limit} bytes; send fewer or smaller images per request",
        {"limit_bytes": limit},
    )


def _too_many(count: int, limit: int) -> ApiError:
    return ApiError(
        413,
        "too_many_images",
        f"{count} images in one request; at most {limit} are accepted, split the request",
        {"limit": limit},
    )


def _cache(request: Request) -> ModelCache:
    cache: ModelCache = request.app.state.models
    return cache
