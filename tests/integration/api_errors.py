"""The API's error shape, checked the same way by every integration test."""

from __future__ import annotations

from typing import Any

import httpx


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """`response` is `status` with `{"error": {"code": code, "message": <not empty>, ...}}`;
    the error object is returned for further checks."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert body["code"] == code, body
    assert body["message"]
    return body
