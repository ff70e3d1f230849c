"""Who is calling, and may they: the API key on every /v1 route (docs/security.md).

Each router (or route) declares the scope it needs with `authorize(Scope.X)`, a FastAPI
Security dependency: /openapi.json then lists the scope under the operation's `security`, and
tests/integration/test_auth.py calls every route so declared, with every kind of bad key. The
caller's Principal is kept on `request.state.principal` for the tenant dependency, the audit
trail and the rate limits.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer, SecurityScopes
from starlette.concurrency import run_in_threadpool

from service import api_keys
from service.api_keys import DEFAULT_TENANT, Principal, Scope
from service.db import Database
from service.ids import utcnow
from service.settings import Settings

log = logging.getLogger(__name__)

# Declared for /openapi.json (and the /docs "Authorize" button); the headers are read below.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="`Authorization: Bearer bsk_...`",
)
key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="apiKeyHeader",
    description="`X-API-Key: bsk_...` (the same keys)",
)
AUTH_OFF = Principal(DEFAULT_TENANT, frozenset({Scope.ADMIN}), key_id=None, global_admin=True)
# A key checked in the database is trusted this long by this process: a database round trip
# per request cost ~12% of a tiny model's predict throughput (benchmarks/RESULTS.md). A key
# revoked through another gateway process stops working here within this time.
CACHE_SECONDS = 5.0
CACHE_ENTRIES = 10_000


class PrincipalCache:
    """Recently authenticated keys, by a digest of the key (the key itself is not kept)."""

    def __init__(
        self,
        seconds: float = CACHE_SECONDS,
        entries: int = CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds, self.entries, self.clock = seconds, entries, clock
        self._items: OrderedDict[bytes, tuple[float, Principal]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _digest(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def get(self, token: str) -> Principal | None:
        digest = self._digest(token)
        with self._lock:
            item = self._items.get(digest)
            if item is None:
                return None
            until, principal = item
            expired = principal.expires_at is not None and principal.expires_at <= utcnow()
            if self.clock() >= until or expired:
                del self._items[digest]
                return None
            return principal

    def put(self, token: str, principal: Principal) -> None:
        with self._lock:
            self._items[self._digest(token)] = (self.clock() + self.seconds, principal)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)

    def forget(self, key_id: str) -> None:
        """Drop a key at once (revoked through this process)."""
        with self._lock:
            for digest in [d for d, (_, p) in self._items.items() if p.key_id == key_id]:
                del self._items[digest]


def presented_key(request: Request) -> str | None:
    """The key in `Authorization: Bearer`, else in `X-API-Key`."""
    authorization = request.headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


async def _principal(
    security_scopes: SecurityScopes,
    request: Request,
    _bearer: Annotated[Any, Depends(bearer)],
    _header: Annotated[Any, Depends(key_header)],
) -> Principal:
    settings: Settings = request.app.state.settings
    if settings.auth == "off":
        principal = AUTH_OFF
    else:
        db: Database = request.app.state.db
        cache: PrincipalCache = request.app.state.principals
        token = presented_key(request)

        def check() -> Principal:
            with db.sessionmaker() as session:
                return api_keys.authenticate(session, token, settings.pepper)

        cached = cache.get(token) if token else None
        if cached is None:
            principal = await run_in_threadpool(check)
            cache.put(token or "", principal)
        else:
            principal = cached
    # Kept before the scope check: the audit trail names a valid key even when it is refused.
    request.state.principal = principal
    api_keys.require(principal, frozenset(Scope(s) for s in security_scopes.scopes))
    return principal


def authorize(*scopes: Scope) -> Any:
    """The dependency a route (or router) declares: a valid key holding one of `scopes`
    (/openapi.json lists them under the operation's `security`)."""
    return Security(_principal, scopes=[scope.value for scope in scopes])


def principal_of(request: Request) -> Principal:
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:  # a route without authorize(): a bug the auth test catches
        raise RuntimeError(f"{request.url.path} declares no authorize() dependency")
    return principal


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth_setting(settings: Settings) -> None:
    """BITSERVE_AUTH=off is for a laptop: refused unless the API listens on loopback only."""
    if settings.auth != "off":
        return
    if not is_loopback(settings.host):
        raise SystemExit(
            f"bitserve: BITSERVE_AUTH=off is refused while the API listens on {settings.host}: "
            "anyone who reaches the port could read and delete every dataset and model. "
            "Listen on 127.0.0.1 (BITSERVE_HOST) or keep BITSERVE_AUTH=required."
        )
    log.warning(
        "BITSERVE_AUTH=off: API keys are not checked; every caller is an admin of tenant %r "
        "(allowed because the API listens on %s only)",
        DEFAULT_TENANT,
        settings.host,
    )
