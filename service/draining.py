"""Stopping the gateway without dropping requests: SIGTERM drains, new requests get 503.

On the first SIGTERM (or Ctrl-C) `bitserve api`:

1. stops accepting connections at once (its listening socket is closed: with SO_REUSEPORT a
   second `bitserve api` on the same port takes every new connection from then on);
2. answers every request that arrives on an already open connection 503 `shutting_down`, with
   `Retry-After: 1` and `Connection: close`: the client's retry opens a new connection, which
   reaches a process that is not stopping;
3. lets the requests already in flight (predictions included) finish, for up to
   BITSERVE_SHUTDOWN_GRACE_SECONDS, then has uvicorn close the idle connections and exits 0.

A second signal stops waiting. `Drain` is the state, `DrainMiddleware` the refusal and the
count of requests in flight, `DrainingServer` the uvicorn server that runs the steps above.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from service.domain_errors import Unavailable
from service.http_errors import domain_error_response

log = logging.getLogger(__name__)

# The refused client should come back at once, on a new connection (to the other process).
SHUTTING_DOWN_RETRY_AFTER = 1


class Drain:
    """Whether this process is stopping, and how many requests it is still serving."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.started_at: float | None = None

    def start(self) -> None:
        if not self.draining:
            self.draining = True
            self.started_at = time.monotonic()


def shutting_down() -> Unavailable:
    return Unavailable(
        "shutting_down",
        "this server is shutting down; retry (a new connection reaches a running one)",
        retry_after=SHUTTING_DOWN_RETRY_AFTER,
    )


class DrainMiddleware:
    """Counts requests in flight; once draining, refuses new ones (pure ASGI, event loop only,
    so the count needs no lock)."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            response = domain_error_response(shutting_down())
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with the drain above between the signal and uvicorn's own shutdown
    (which closes idle connections and waits for the last answers to be written)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, grace_seconds: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.grace_seconds = grace_seconds
        self.listening_closed = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining:  # a second signal: stop waiting for requests in flight
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self.force_exit = True
            return
        self._captured_signals.append(sig)
        log.info("signal %d: draining (up to %.0f s)", sig, self.grace_seconds)
        self.drain.start()

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.should_exit:
            if not self.listening_closed:
                self.listening_closed = True
                for server in getattr(self, "servers", ()):
                    server.close()  # no new connections; open ones get 503 shutting_down
            waited = time.monotonic() - (self.drain.started_at or time.monotonic())
            if self.drain.in_flight == 0 or waited >= self.grace_seconds:
                log.info(
                    "drained in %.2f s (%d request(s) still in flight)",
                    waited,
                    self.drain.in_flight,
                )
                # uvicorn's shutdown waits for the rest (answers being written) only briefly.
                self.config.timeout_graceful_shutdown = max(1, int(self.grace_seconds - waited))
                self.should_exit = True
        return await super().on_tick(counter)
