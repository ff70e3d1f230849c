"""The audit trail's middleware: every POST, PUT, PATCH and DELETE under /v1 becomes one
audit event (service.audit) once its answer's status is known, refusals (401, 403, 404, 4xx)
included.

Pure ASGI (like service.metrics.MetricsMiddleware): upload streams pass untouched. The event
is written in a worker thread, never on the event loop, and *before* the answer leaves: the
middleware holds a JSON answer (up to BODY_LIMIT bytes) until its row is written, so a client
that has its answer finds the event in GET /v1/audit. A larger or streamed answer is sent as it
comes and its event written right after. A failed write is logged as a warning and never fails
the call.

Who: the key id and tenant of the caller (request.state.principal, set by service.auth even
when the key lacks the route's scope). A call refused before its key was checked (an
unparseable body, an unknown route) names the presented key's id only if that key is valid;
a 401 names nobody. The key itself is never kept, logged or written.

What: the method, the route *template* (/v1/jobs/{job_id}/cancel; "unmatched" for a path no
route has, whose raw text is not kept), and the object: the path's id parameter, else for a
successful creation the `id` of the JSON answer (read only from answers under BODY_LIMIT).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import api_keys, audit
from service.api_keys import Principal
from service.auth import AUTH_OFF, presented_key
from service.db import Database
from service.domain_errors import DomainError
from service.ids import is_id
from service.settings import Settings

log = logging.getLogger(__name__)

AUDITED_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# POST routes that change nothing. A prediction is a read: a row (and a database write before
# the answer) per prediction would slow the serving path and bury the trail.
NOT_AUDITED = frozenset({"/v1/models/{model_id}/predict"})
BODY_LIMIT = 64 * 1024
# An id from the URL is kept as it is only if it looks like one; anything else is kept as its
# escaped, shortened ascii() (no newline or control character reaches the log line).
SAFE_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")


class AuditMiddleware:
    def __init__(self, app: ASGIApp, db: Database, settings: Settings) -> None:
        self.app = app
        self.db = db
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in AUDITED_METHODS
            or not scope["path"].startswith("/v1/")
        ):
            await self.app(scope, receive, send)
            return
        status = 500
        held: list[Message] | None = None  # the answer so far, while it is held back
        held_bytes = 0
        passing = False  # the answer goes straight through (not audited, or too big to hold)
        done = False  # the event is written (or its write failed and was logged)

        async def flush() -> None:
            nonlocal held, passing
            passing = True
            for message in held or ():
                await send(message)
            held = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status, held, held_bytes, done
            if passing:
                await send(message)
                return
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if _route_template(scope) in NOT_AUDITED:
                    done = True
                    await flush()
                    await send(message)
                    return
                held = [message]
                return
            if held is None:  # not an answer we know how to hold: let it through
                await flush()
                await send(message)
                return
            held.append(message)
            if message["type"] != "http.response.body":
                return
            held_bytes += len(message.get("body", b""))
            if not message.get("more_body", False):
                done = True
                await self._record(scope, status, _json_body(held))
                await flush()
            elif held_bytes > BODY_LIMIT:
                await flush()  # too big to hold: recorded once it has been sent

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            if not passing:
                status = 500  # nothing (or only what was held) left: the server answers 500
            raise
        finally:
            if not done and _route_template(scope) not in NOT_AUDITED:
                with anyio.CancelScope(shield=True):
                    await self._record(scope, status, None)
        if held is not None:  # an answer that never said its body was complete
            await flush()

    async def _record(self, scope: Scope, status: int, body: bytes | None) -> None:
        route = _route_template(scope)
        principal: Principal | None = scope.get("state", {}).get("principal")
        if principal is None and self.settings.auth == "off":
            principal = AUTH_OFF
        token = presented_key(Request(scope)) if principal is None and status != 401 else None
        object_id = _path_object_id(scope.get("path_params") or {})
        method = str(scope["method"])

        def write() -> None:
            try:
                with self.db.sessionmaker() as session:
                    caller = principal or _valid_caller(session, token, self.settings)
                    subject = object_id
                    if subject is None and body is not None and 200 <= status < 300:
                        subject = _created_id(body)
                    entry = audit.Entry(
                        method=method,
                        route=route,
                        status=status,
                        tenant_id=caller.tenant_id if caller else None,
                        key_id=caller.key_id if caller else None,
                        object_id=subject,
                    )
                    audit.record(session, entry)
            except Exception:
                log.warning(
                    "audit: could not record %s %s -> %d", method, route, status, exc_info=True
                )

        await run_in_threadpool(write)


def _valid_caller(session: Any, token: str | None, settings: Settings) -> Principal | None:
    """The caller of a call refused before its key was checked, if the key is valid."""
    if not token:
        return None
    try:
        return api_keys.authenticate(session, token, settings.pepper)
    except DomainError:
        return None


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(path) if path else "unmatched"


def _path_object_id(params: dict[str, Any]) -> str | None:
    """The last path parameter named like an id (job_id, model_id, ...), made safe to log."""
    for name in reversed(list(params)):
        if name == "id" or name.endswith("_id"):
            value = str(params[name])
            return value if SAFE_ID.match(value) else ascii(value)[:64]
    return None


def _json_body(messages: list[Message]) -> bytes | None:
    start = messages[0] if messages else {}
    headers = dict(start.get("headers", []))
    if not headers.get(b"content-type", b"").startswith(b"application/json"):
        return None
    return b"".join(m.get("body", b"") for m in messages[1:] if m["type"] == "http.response.body")


def _created_id(body: bytes) -> str | None:
    """The `id` of a JSON answer (a new dataset, job or key), if it is one of our ids."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    ident = value.get("id") if isinstance(value, dict) else None
    return ident if isinstance(ident, str) and is_id(ident) else None
