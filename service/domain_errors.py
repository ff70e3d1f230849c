"""The errors a client can act on, free of any web framework.

Plain functions (datasets, jobs, job runs, the model store, archives, request bodies) raise
these; they carry a machine `code`, a message saying what went wrong and what to do, and
`details`. What kind of error it is, is its class; the HTTP status of each kind is decided in
one table in the web layer (service.http_errors.STATUS), and nowhere else.

    Unauthenticated     no API key, or a bad, expired or revoked one
    Forbidden           a valid key without the scope the route needs
    NotFound            unknown id, or another tenant's (the two look exactly alike)
    Conflict            the object's state forbids it now (a job already finished, ...)
    InvalidRequest      well-formed but invalid values (a bad override, an unreadable image)
    MalformedRequest    a body that cannot be parsed at all (bad JSON, bad multipart)
    TooLarge            over a size or count limit (body bytes, images per request, archives)
    UnsupportedMedia    a body of a type the route does not take
    Gone                the object exists but its files are lost
    QuotaExceeded       past a tenant's quota or a key's rate: retry after `retry_after` s
    Unavailable         busy or a dependency is down: retry after `retry_after` seconds
    InsufficientStorage the server's disk is full (or over its disk quota)
    RequestTimeout      the request's headers or body arrived too slowly
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every error the API reports in its error shape."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = dict(details or {})


class Unauthenticated(DomainError):
    pass


class Forbidden(DomainError):
    pass


class NotFound(DomainError):
    def __init__(self, kind: str, object_id: str) -> None:
        super().__init__("not_found", f"{kind} {object_id!r} does not exist")
        self.kind = kind
        self.object_id = object_id


class Conflict(DomainError):
    pass


class InvalidRequest(DomainError):
    pass


class MalformedRequest(DomainError):
    pass


class TooLarge(DomainError):
    pass


class UnsupportedMedia(DomainError):
    pass


class Gone(DomainError):
    pass


class Unavailable(DomainError):
    """Retry later; `retry_after` (seconds) becomes the Retry-After header."""

    def __init__(
        self,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        retry_after: int = 5,
    ) -> None:
        super().__init__(code, message, details)
        self.retry_after = retry_after


class QuotaExceeded(DomainError):
    """Over a quota; `retry_after` (seconds) becomes the Retry-After header."""

    def __init__(
        self,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        retry_after: int = 60,
    ) -> None:
        super().__init__(code, message, details)
        self.retry_after = retry_after


class InsufficientStorage(DomainError):
    """The server could not store what the request sent: its disk is full (ENOSPC/EDQUOT)."""


def payload_too_large(limit: int, hint: str = "") -> TooLarge:
    """The one answer for a body over its byte cap (uploads and predict requests alike)."""
    message = f"the request body is larger than the limit of {limit} bytes"
    return TooLarge(
        "payload_too_large", f"{message}; {hint}" if hint else message, {"limit_bytes": limit}
    )


class RequestTimeout(DomainError):
    """The request did not arrive in time (headers or body too slow): send it again, faster."""
