"""Request bodies read under a byte cap enforced while they stream (chunked bodies too).

FastAPI's own form parsing would accept any size, so every body that can be large is read
through `capped_stream`: the declared Content-Length is checked before a byte is read, and the
bytes actually received are counted as they arrive. Uploads (service.uploads) and predict
requests (`read_images`) share it, and answer the same error past the cap. An upload also
has a second, lower cap: the tenant's remaining byte quota (`QuotaCap`), with its own error.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from service.domain_errors import (
    DomainError,
    InvalidRequest,
    MalformedRequest,
    TooLarge,
    UnsupportedMedia,
    payload_too_large,
)
from service.settings import Settings

FILES_FIELD = "files"
PREDICT_HINT = "send fewer or smaller images per request"


@dataclass(frozen=True)
class QuotaCap:
    """A cap that may lie below the body's own: past `limit` bytes, `error()` is raised (a
    tenant's byte quota: 429, retry later) instead of payload_too_large (413: never)."""

    limit: int
    error: Callable[[], DomainError]


def check_declared_length(
    request: Request, limit: int, hint: str = "", *, quota: QuotaCap | None = None
) -> None:
    """The Content-Length, if any, against `limit` and `quota`: refused before a byte of the
    body is read (the errors of capped_stream)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise MalformedRequest("malformed_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise payload_too_large(limit, hint)
        if quota is not None and int(declared) > quota.limit:
            raise quota.error()


async def capped_stream(
    request: Request, limit: int, hint: str = "", *, quota: QuotaCap | None = None
) -> AsyncGenerator[bytes, None]:
    """The body of `request`, chunk by chunk; TooLarge (payload_too_large) as soon as the
    declared or the received length passes `limit` bytes, `quota.error()` as soon as it
    passes `quota.limit` (and not `limit`), MalformedRequest if the client goes away."""
    check_declared_length(request, limit, hint, quota=quota)
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise payload_too_large(limit, hint)
            if quota is not None and total > quota.limit:
                raise quota.error()
            yield chunk
    except ClientDisconnect:
        raise MalformedRequest("client_disconnected", "the client went away") from None


async def read_images(request: Request, settings: Settings) -> tuple[list[str], list[bytes]]:
    """(names, contents) of the request's images, in order; names are filenames or "#i"."""
    limit = int(settings.predict_max_request_bytes)
    # A request larger than the whole queue could never be admitted: "too many", not "busy".
    max_images = min(int(settings.predict_max_images_per_request), int(settings.predict_max_queue))
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type == "multipart/form-data":
        names, images = await _read_multipart(request, limit, max_images)
    elif content_type == "application/json" or content_type.endswith("+json"):
        names, images = await _read_json(request, limit, max_images)
    else:
        raise UnsupportedMedia(
            "unsupported_media_type",
            f"send images as multipart/form-data (field {FILES_FIELD!r}) or as application/json "
            '{"instances": [{"image_b64": "..."}]}; got ' + repr(content_type or "no type"),
        )
    if not images:
        raise InvalidRequest("no_images", f"no images: add one or more {FILES_FIELD!r} parts")
    if len(images) > max_images:
        raise _too_many(len(images), max_images)
    return names, images


async def _read_multipart(
    request: Request, limit: int, max_images: int
) -> tuple[list[str], list[bytes]]:
    parser = MultiPartParser(
        request.headers,
        capped_stream(request, limit, PREDICT_HINT),
        max_files=max_images + 1,  # one over, so "too many" is ours to report
        max_fields=16,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise _too_many(max_images + 1, max_images) from exc
        raise MalformedRequest("malformed_request", f"bad multipart body: {exc.message}") from exc
    names: list[str] = []
    images: list[bytes] = []
    try:
        for key, value in form.multi_items():
            if not isinstance(value, UploadFile):
                continue
            if key != FILES_FIELD:
                raise InvalidRequest(
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
    body = b"".join([chunk async for chunk in capped_stream(request, limit, PREDICT_HINT)])
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedRequest("malformed_request", f"the body is not valid JSON: {exc}") from exc
    except RecursionError:  # nested deeper than the parser's stack (issue 11): not a 500
        raise MalformedRequest(
            "malformed_request", "the body's JSON is nested too deeply to parse"
        ) from None
    instances = payload.get("instances") if isinstance(payload, dict) else None
    if not isinstance(instances, list):
        raise InvalidRequest(
            "invalid_request", 'expected {"instances": [{"image_b64": "..."}, ...]}'
        )
    if len(instances) > max_images:
        raise _too_many(len(instances), max_images)
    names: list[str] = []
    images: list[bytes] = []
    for index, instance in enumerate(instances):
        encoded = instance.get("image_b64") if isinstance(instance, dict) else None
        if not isinstance(encoded, str):
            raise InvalidRequest(
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
        raise InvalidRequest(
            "invalid_base64",
            f"instances[{index}].image_b64 is not valid base64: {exc}",
            {"index": index},
        ) from exc


def _too_many(count: int, limit: int) -> TooLarge:
    return TooLarge(
        "too_many_images",
        f"{count} images in one request; at most {limit} are accepted, split the request",
        {"limit": limit},
    )
