"""Errors on the wire: one table from error kind to HTTP status, and one error shape.

Every error answer is {"error": {"code", "message", "details"}} (docs/api.md, "Errors").
Plain functions raise the kinds of service.domain_errors; the status of each kind is decided here and
nowhere else. The handlers also turn FastAPI's validation errors, Starlette's HTTP errors and
unexpected exceptions into that shape; an unexpected exception is logged and answered 500
without a traceback, so internals never reach clients.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.db import UNAVAILABLE_ERRORS
from service.domain_errors import (
    Conflict,
    DomainError,
    Forbidden,
    Gone,
    InsufficientStorage,
    InvalidRequest,
    MalformedRequest,
    NotFound,
    QuotaExceeded,
    RequestTimeout,
    TooLarge,
    Unauthenticated,
    Unavailable,
    UnsupportedMedia,
)
from service.schemas import ErrorBody

log = logging.getLogger(__name__)

# The one place an error kind becomes an HTTP status. A kind missing here is a bug that
# tests/unit/test_http_errors.py catches (every DomainError subclass must resolve).
STATUS: dict[type[DomainError], int] = {
    MalformedRequest: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    RequestTimeout: 408,
    Conflict: 409,
    Gone: 410,
    TooLarge: 413,
    UnsupportedMedia: 415,
    InvalidRequest: 422,
    QuotaExceeded: 429,
    Unavailable: 503,
    InsufficientStorage: 507,
}
DEFAULT_RETRY_AFTER = "5"
# A PostgreSQL restart takes a few seconds; clients come back after this long.
DATABASE_RETRY_AFTER = 5
# Codes for errors FastAPI or Starlette raise themselves (unknown routes, wrong methods, ...).
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "service_unavailable",
}
# FastAPI's answer to a body it cannot decode at all (JSON that is not UTF-8, a broken form):
# the same `malformed_request` as JSON that does not parse (docs/api.md).
UNPARSEABLE_BODY = "There was an error parsing the body"


def status_of(error: DomainError) -> int:
    """The HTTP status of an error kind: the nearest class in its MRO that STATUS names."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    raise LookupError(f"{type(error).__name__} has no HTTP status in service.http_errors.STATUS")


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    headers = dict(headers or {})
    if status in (429, 503):
        headers.setdefault("Retry-After", DEFAULT_RETRY_AFTER)
    body = jsonable_encoder(error_body(code, message, details))
    return JSONResponse(body, status_code=status, headers=headers)


def domain_error_response(error: DomainError) -> JSONResponse:
    headers = {}
    if isinstance(error, Unavailable | QuotaExceeded):
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthenticated):
        # RFC 6750: the scheme, and why a key that was sent is refused.
        invalid = ', error="invalid_token"' if error.code != "missing_api_key" else ""
        headers["WWW-Authenticate"] = f'Bearer realm="bitserve"{invalid}'
    return error_response(status_of(error), error.code, error.message, error.details, headers)


def raw_error_response(error: DomainError) -> bytes:
    """The whole HTTP/1.1 answer for `error`, as bytes, closing the connection: for the
    protocol layer (service.connections), where no ASGI app runs."""
    status = status_of(error)
    body = json.dumps(error_body(error.code, error.message, error.details)).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return domain_error_response(exc)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    if any(e["type"] == "json_invalid" for e in errors):
        return error_response(
            400, "malformed_request", "the body is not valid JSON", {"errors": errors}
        )
    where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
    what = str(errors[0]["msg"]) if errors else "invalid request"
    message = f"{where}: {what}" if where else what
    details: dict[str, Any] = {"errors": errors}
    if errors and len(errors[0]["loc"]) > 1:  # the field, without "body." or "query."
        details["field"] = ".".join(str(p) for p in errors[0]["loc"][1:])
    return error_response(422, "invalid_request", message, details)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == UNPARSEABLE_BODY:
        return error_response(400, "malformed_request", "the body could not be parsed")
    code = HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404 and message == "Not Found":
        message = "no such route or object"
    return error_response(exc.status_code, code, message, None, dict(exc.headers or {}))


def database_unavailable() -> Unavailable:
    return Unavailable(
        "database_unavailable",
        "the database cannot be reached right now; retry after Retry-After seconds",
        retry_after=DATABASE_RETRY_AFTER,
    )


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    # The database is down or restarting (service.db.UNAVAILABLE_ERRORS), wherever the route
    # or its dependencies (the API key check included) met it: retry later, not a 500. One
    # line without the traceback: an outage makes one per request.
    log.warning(
        "database unavailable on %s %s: %s",
        request.method,
        request.url.path,
        str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
    )
    return domain_error_response(database_unavailable())


async def _data_error(request: Request, exc: Exception) -> JSONResponse:
    # The database refused a value the request carried (PostgreSQL: text with a NUL character,
    # found by tests/fuzz): the request is invalid, not the server broken. Logged, as the
    # database's own words are not the client's to read.
    log.warning(
        "a value refused by the database on %s %s: %s", request.method, request.url.path, exc
    )
    return error_response(
        422, "invalid_request", "a value in the request cannot be stored (e.g. a NUL character)"
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal error; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for kind in UNAVAILABLE_ERRORS:
        app.add_exception_handler(kind, _database_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(Exception, _unexpected)


DESCRIPTIONS = {
    400: "Malformed request (unparseable body, bad cursor)",
    401: "No API key, or a bad, expired or revoked one (WWW-Authenticate: Bearer)",
    403: "The API key lacks the scope this route needs",
    404: "Unknown id, or not yours",
    409: "The object's state does not allow this now",
    410: "The object's files are gone",
    413: "Over a size or count limit",
    415: "Unsupported body type",
    422: "Invalid values",
    429: "Over a quota or rate limit; retry after Retry-After seconds",
    503: "Busy or a dependency is down; retry after Retry-After seconds",
    507: "The server's disk is full; nothing was stored",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, each with the error body's schema."""
    return {
        status: {"model": ErrorBody, "description": DESCRIPTIONS[status]} for status in statuses
    }
