"""Connection limits and timeouts: no client holds the gateway's sockets or file descriptors.

uvicorn bounds idle keep-alive connections (timeout_keep_alive) but not a request that never
finishes arriving. This module adds, in uvicorn's own protocol (httptools) and as ASGI:

- a connection cap: a connection accepted while `max_connections` are open is served by an
  app that answers 503 `too_many_connections` (Retry-After, Connection: close) to anything but
  `/healthz` (liveness: a full gateway is not a dead one, so an orchestrator must not restart
  it; `/readyz` says 503 and takes it out of rotation). Past the cap plus OVERFLOW_CONNECTIONS
  a connection is reset at once, so descriptors stay bounded however fast they arrive;
- a header timeout: the request line and headers must arrive within `header_timeout_seconds`
  of the connection (or of the first byte of the next request on a kept-alive one), else 408
  `request_timeout` and the connection is closed (slowloris);
- a body timeout (BodyTimeoutMiddleware): no `receive()` of the body may wait more than
  `body_idle_timeout_seconds`, and once the body has been arriving for that long it must
  average `body_min_bytes_per_second` (a body trickled a byte at a time); else 408
  `request_timeout`, the app sees a client disconnect (uploads delete their temp files).

`raise_fd_limit` lifts RLIMIT_NOFILE's soft limit to the hard one at start-up and lowers the
cap if descriptors would still run out. docs/operations.md ("Connections and streams") names the
reverse-proxy settings to put in front as well.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.domain_errors import DomainError, RequestTimeout, Unavailable
from service.http_errors import domain_error_response, raw_error_response
from service.settings import Settings

log = logging.getLogger(__name__)

# Connections past the cap that are still accepted so that they can be told 503 (and /healthz
# answered); beyond this many more they are reset without a word.
OVERFLOW_CONNECTIONS = 64
# Descriptors kept for everything that is not a client connection: database and Redis
# pools, uploaded files, model files, logs.
RESERVED_DESCRIPTORS = 256
LIVENESS_PATH = "/healthz"
RETRY_AFTER_FULL = 1


def too_many_connections() -> Unavailable:
    # 503, not 429: the gateway is full for everyone, not this client over its share.
    return Unavailable(
        "too_many_connections",
        "The gateway has as many connections open as it accepts; retry shortly.",
        retry_after=RETRY_AFTER_FULL,
    )


def request_timeout(what: str, seconds: float) -> DomainError:
    return RequestTimeout(
        "request_timeout",
        f"The request's {what} did not arrive in time ({seconds:g} s); send it faster.",
        {"timeout_seconds": seconds},
    )


class FullGatewayApp:
    """Serves a connection accepted past the cap: 503 to everything but the liveness probe."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == LIVENESS_PATH:
            await self.app(scope, receive, send)
            return
        response = domain_error_response(too_many_connections())
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the connection cap and the header timeout."""

    max_connections: int = 0  # 0: no cap (set by connection_options on a subclass)
    header_timeout: float = 0.0  # 0: none

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        open_now = len(self.connections)  # this one included
        if self.max_connections and open_now > self.max_connections:
            if open_now > self.max_connections + OVERFLOW_CONNECTIONS:
                transport.abort()  # no descriptor held, no answer owed
                return
            self.app = FullGatewayApp(self.app)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_deadline()  # the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def _arm_header_deadline(self) -> None:
        if self.header_timeout and self._header_deadline is None:
            self._header_deadline = self.loop.call_later(
                self.header_timeout, self._headers_too_slow
            )

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        # No request is in progress (its headers never completed): answer and close.
        error = request_timeout("headers", self.header_timeout)
        self.transport.write(raw_error_response(error))
        self.transport.close()


class BodyTimeoutMiddleware:
    """Bounds every wait for the request body (pure ASGI; see the module docstring)."""

    def __init__(self, app: ASGIApp, idle_seconds: float, min_bytes_per_second: float) -> None:
        self.app = app
        self.idle_seconds = idle_seconds
        self.min_rate = min_bytes_per_second

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        received = 0
        body_done = False
        timed_out: DomainError | None = None
        response_started = False

        async def bounded_receive() -> Message:
            nonlocal received, body_done, timed_out
            if body_done or timed_out is not None:
                # After the body: waiting for a disconnect (streams) is not bounded.
                return await receive() if timed_out is None else {"type": "http.disconnect"}
            now = time.monotonic()
            # The body must average min_rate once it has been arriving for idle_seconds.
            rate_deadline = started + self.idle_seconds + received / self.min_rate
            wait = min(self.idle_seconds, rate_deadline - now)
            try:
                with anyio.fail_after(max(wait, 0.0)):
                    message = await receive()
            except TimeoutError:
                what = "body" if wait >= self.idle_seconds else f"body at {self.min_rate:g} bytes/s"
                timed_out = request_timeout(what, self.idle_seconds)
                return {"type": "http.disconnect"}  # the app stops reading, cleans up
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if timed_out is not None and not response_started:
                return  # the 408 below replaces whatever the app answers to the "disconnect"
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except Exception:
            if timed_out is None:
                raise
            # The app failed on the "disconnect" it was handed (e.g. a half-read form): the
            # answer is the 408 all the same, and nothing went wrong in the gateway.
        if timed_out is not None and not response_started:
            response = domain_error_response(timed_out)
            response.headers["Connection"] = "close"
            await response(scope, receive, send)


def raise_fd_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # e.g. macOS refuses above OPEN_MAX
            log.warning("could not raise the open-files limit above %d", soft)
    return soft


def connection_cap(settings: Settings, fd_limit: int) -> int:
    """max_connections, lowered if the descriptors would run out before it is reached."""
    room = fd_limit - RESERVED_DESCRIPTORS - OVERFLOW_CONNECTIONS
    cap = max(1, min(settings.max_connections, room))
    if cap < settings.max_connections:
        log.warning(
            "max_connections lowered from %d to %d: the open-files limit is %d",
            settings.max_connections,
            cap,
            fd_limit,
        )
    return cap


def connection_options(settings: Settings, fd_limit: int | None = None) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for the limits above (the app gets the body timeout
    from service.app)."""
    limit = raise_fd_limit() if fd_limit is None else fd_limit
    protocol = type(
        "LimitedHttpProtocol",
        (LimitedHttpProtocol,),
        {
            "max_connections": connection_cap(settings, limit),
            "header_timeout": settings.header_timeout_seconds,
        },
    )
    return {"http": protocol, "timeout_keep_alive": settings.keep_alive_seconds}
