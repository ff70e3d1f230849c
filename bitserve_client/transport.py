"""The HTTP layer under BitserveClient: one httpx.Client, the retries of bitserve_client.retries
(the client module's docstring lists what is retried), error answers raised as ApiError, paged
listings and streamed answers, and the small helpers the client's methods share."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import quote

import httpx

from bitserve_client.errors import ApiError, ServerUnreachable
from bitserve_client.retries import IDEMPOTENT_METHODS, NOT_SENT, RetryPolicy

FilesFactory = Callable[[ExitStack], list[tuple[str, tuple[str, IO[bytes] | bytes, str]]]]

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
PAGE_SIZE = 100


class Transport:
    """The connection and the request loop; BitserveClient adds the API's calls on top."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 60.0,
        *,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if max_retries < 0 or max_retry_wait < 0:
            raise ValueError("max_retries and max_retry_wait must be >= 0")
        headers = {"User-Agent": "bitserve-client/0.1", "Accept": "application/json"}
        if api_key is None:
            api_key = default_api_key()
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self._retry = RetryPolicy(max_retries, max_retry_wait)
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._request("GET", path, params=params).json()

    def _pages(self, path: str, params: dict[str, Any], size: int) -> Iterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            query = {**params, "limit": size, **({"cursor": cursor} if cursor else {})}
            page = self._get(path, query)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        data: dict[str, str] | None = None,
        files: FilesFactory | None = None,
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Send; retry what the module docstring lists, at most max_retries times, each wait
        capped at max_retry_wait (Retry-After, else a doubling back-off); raise ApiError on an
        error answer; ServerUnreachable when no try could connect; else the last
        httpx.TransportError."""
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        attempt = 0
        while True:
            try:
                with ExitStack() as stack:
                    response = self._http.request(
                        method,
                        path,
                        params=params,
                        json=json,
                        data=data,
                        files=files(stack) if files is not None else None,
                        headers=headers,
                        timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                    )
            except httpx.TransportError as exc:
                wait = self._retry.after_lost_connection(
                    exc, idempotent=idempotent, attempt=attempt
                )
                if wait is None:
                    if isinstance(exc, NOT_SENT):  # nothing answered on any try
                        raise ServerUnreachable.from_error(self.base_url, exc) from exc
                    raise
                time.sleep(wait)
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            error = ApiError.from_response(response)
            wait = self._retry.after_error(
                response.status_code, error, idempotent=idempotent, attempt=attempt
            )
            if wait is None:
                raise error
            time.sleep(wait)
            attempt += 1

    @contextmanager
    def _stream(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        params: dict[str, str] | None = None,
    ) -> Iterator[httpx.Response]:
        wait = timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT
        with ExitStack() as stack:
            # Not retried (the module docstring of bitserve_client.client); only the opening
            # is looked at, so an error of the caller's, inside the block, passes unchanged.
            try:
                response = stack.enter_context(
                    self._http.stream(method, path, headers=headers, timeout=wait, params=params)
                )
            except NOT_SENT as exc:
                raise ServerUnreachable.from_error(self.base_url, exc) from exc
            if response.status_code >= 400:
                response.read()
                raise ApiError.from_response(response)
            yield response


# -- helpers ---------------------------------------------------------------------------------


def default_api_key() -> str | None:
    """$BITSERVE_API_KEY, else the key in $BITSERVE_HOME/admin.key, else None."""
    key = os.environ.get("BITSERVE_API_KEY", "").strip()
    if key:
        return key
    path = Path(os.environ.get("BITSERVE_HOME", ".bitserve")).expanduser() / "admin.key"
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def seg(value: str) -> str:
    """An id as one path segment: "../x" can never reach another route."""
    return quote(value, safe="")


def save(response: httpx.Response, target: Path) -> None:
    """Stream an answer's body to `target`; the file appears only once complete."""
    partial = target.with_name(target.name + ".part")
    try:
        with partial.open("wb") as out:
            for chunk in response.iter_bytes(1 << 20):
                out.write(chunk)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def poll_until_ended(
    get: Callable[[], dict[str, Any]], timeout: float | None, poll_interval: float
) -> tuple[dict[str, Any], bool]:
    """`get()` every `poll_interval` seconds until its status has ended, or `timeout` seconds
    have passed: (the last state, whether it ended)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = get()
        if state.get("status") in FINISHED:
            return state, True
        if deadline is not None and time.monotonic() >= deadline:
            return state, False
        time.sleep(poll_interval)
