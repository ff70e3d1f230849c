"""The API's error type, free of any web framework so plain functions (and the worker's
imports) can raise it; service.errors turns it into {"error": {"code", "message", "details"}}."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error the client can act on; raised from plain functions and routes alike."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers or {}


def not_found(kind: str, object_id: str) -> ApiError:
    return ApiError(404, "not_found", f"{kind} {object_id!r} does not exist")
