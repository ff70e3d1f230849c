"""A byte cap on every request body that no route streams itself (JSON bodies, mostly).

FastAPI reads a JSON body whole before a route runs, at any size: a 300 MB `POST /v1/jobs`
took the gateway from 342 MB to 1.57 GB (issue 11). This ASGI middleware answers 413
`payload_too_large` when the Content-Length is over `limit`, before a byte is read, and
otherwise reads the body itself, counting, and stops at `limit` bytes (chunked bodies too);
a body within the cap is then handed to the app as it arrived. Holding up to `limit` bytes
here costs nothing more: the app would have held the whole body anyway.

The routes that take big bodies read them as they stream under their own caps
(service.request_bodies.capped_stream): uploads (BITSERVE_MAX_UPLOAD_BYTES) and predict
requests (BITSERVE_PREDICT_MAX_REQUEST_BYTES). They are named in `STREAMED`.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.domain_errors import payload_too_large
from service.http_errors import domain_error_response

# (method, path pattern) of the routes that cap their bodies as they stream.
STREAMED = (
    ("POST", re.compile(r"^/v1/datasets/?$")),
    ("POST", re.compile(r"^/v1/models/[^/]+/predict/?$")),
)
HINT = "JSON bodies are small: check what is being sent"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _streams_itself(scope):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await self._refuse(scope, receive, send)
            return
        received: list[Message] = []
        total = 0
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":  # the client went away: the app sees it
                break
            total += len(message.get("body", b""))
            if total > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            # What was read, in order; then the real channel (disconnects, for streams).
            if received:
                return received.pop(0)
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = domain_error_response(payload_too_large(self.limit, HINT))
        # The rest of the body is not read: the server closes the connection after answering.
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _streams_itself(scope: Scope) -> bool:
    method, path = scope.get("method", ""), scope.get("path", "")
    return any(method == m and pattern.match(path) for m, pattern in STREAMED)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
