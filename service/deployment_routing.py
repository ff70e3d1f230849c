"""Which model answers a deployment's request, in this gateway process.

The database is the source of truth (service.deployments); each process keeps what it last
read for each name and reads it again once it is older than BITSERVE_DEPLOYMENT_REFRESH_SECONDS.
So a change made through any replica reaches every other one within that bound (plus the
time the new models take to load there; a change made through this process applies here at
once). A new version is not used before its models are loaded and warmed in this process: the
old one keeps answering while a background task loads them, then the pointer moves. A request
picks its model once, at its start, so one in flight finishes on the model it started on.

Splits are smooth weighted round-robin (as nginx's upstreams): over every run of
sum(weights) requests each target answers exactly its weight's share, interleaved, rather
than a share that is only right on average.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from service import deployments
from service.db import Database
from service.deployments import Targets
from service.domain_errors import NotFound

log = logging.getLogger(__name__)

Loader = Callable[[str], Awaitable[object]]  # loads and warms a model (ModelCache.get)


@dataclass(frozen=True)
class Resolved:
    """A deployment as the database has it: what `fetch` returns (None: no such name)."""

    deployment_id: str
    name: str
    version: int
    targets: Targets


Fetch = Callable[[str | None, str], Awaitable[Resolved | None]]


@dataclass
class Route:
    """One version of a deployment, as this process serves it."""

    resolved: Resolved
    checked_at: float
    current: list[int] = field(default_factory=list)  # the round-robin's running weights

    @property
    def version(self) -> int:
        return self.resolved.version

    @property
    def shadow(self) -> str | None:
        return self.resolved.targets.shadow

    def pick(self) -> tuple[str, int]:
        """The target for the next request, and its weight (no await: one request at a time)."""
        split = self.resolved.targets.split
        if len(split) == 1:
            return split[0]
        if len(self.current) != len(split):
            self.current = [0] * len(split)
        total = sum(weight for _, weight in split)
        best = 0
        for i, (_, weight) in enumerate(split):
            self.current[i] += weight
            if self.current[i] > self.current[best]:
                best = i
        self.current[best] -= total
        return split[best]


class DeploymentRoutes:
    def __init__(self, fetch: Fetch, load: Loader, refresh_seconds: float) -> None:
        self.fetch = fetch
        self.load = load
        self.refresh_seconds = refresh_seconds
        self._routes: dict[tuple[str | None, str], Route] = {}
        self._warming: dict[tuple[str | None, str], asyncio.Task[None]] = {}

    async def resolve(self, tenant: str | None, name: str) -> Route:
        key = (tenant, name)
        route = self._routes.get(key)
        now = time.monotonic()
        if route is not None and now - route.checked_at < self.refresh_seconds:
            return route
        resolved = await self.fetch(tenant, name)
        if resolved is None:
            self._routes.pop(key, None)
            raise NotFound("deployment", name)
        if route is not None and route.resolved.deployment_id != resolved.deployment_id:
            route = None  # deleted and made again under the same name: nothing to keep
        if route is not None and resolved.version <= route.version:
            route.checked_at = time.monotonic()
            return route
        if route is None:
            # Nothing served under this name here yet: its first request waits for the load.
            await self._warm(resolved)
            return self._install(key, resolved)
        # A newer version: keep answering with the one warm here until the new one is.
        route.checked_at = time.monotonic()
        if key not in self._warming:
            task = asyncio.get_running_loop().create_task(self._switch(key, resolved))
            self._warming[key] = task
        return route

    async def apply(self, tenant: str | None, resolved: Resolved) -> None:
        """A change made through this process: warm its models, then serve it here at once."""
        await self._warm(resolved)
        key = (tenant, resolved.name)
        route = self._routes.get(key)
        if route is None or route.version < resolved.version:
            self._install(key, resolved)

    def forget(self, tenant: str | None, name: str) -> None:
        self._routes.pop((tenant, name), None)

    async def warm(self, targets: Targets) -> None:
        """Load every model of `targets` (before a change is committed: no cold start after)."""
        for model_id in targets.model_ids:
            await self.load(model_id)

    async def _warm(self, resolved: Resolved) -> None:
        await self.warm(resolved.targets)

    async def _switch(self, key: tuple[str | None, str], resolved: Resolved) -> None:
        try:
            await self._warm(resolved)
        except Exception as exc:  # the old version keeps answering; tried again next refresh
            log.warning(
                "deployment %s version %d: its models do not load here (%s); still serving "
                "the previous version",
                resolved.name,
                resolved.version,
                exc,
            )
        else:
            route = self._routes.get(key)
            if route is None or route.version < resolved.version:
                self._install(key, resolved)
                log.info("deployment %s: now version %d here", resolved.name, resolved.version)
        finally:
            self._warming.pop(key, None)

    def _install(self, key: tuple[str | None, str], resolved: Resolved) -> Route:
        route = Route(resolved, time.monotonic())
        self._routes[key] = route
        return route

    async def close(self) -> None:
        for task in list(self._warming.values()):
            task.cancel()
        self._warming.clear()


async def read_deployment(db: Database, tenant: str | None, name: str) -> Resolved | None:
    """The deployment as the database has it now (None: no such name for the tenant)."""

    def read() -> Resolved | None:
        with db.sessionmaker() as session:
            try:
                row = deployments.get_deployment(session, tenant, name)
            except NotFound:
                return None
            targets = deployments.targets_of(session, row.id)
            return Resolved(row.id, row.name, row.version, targets)

    return await asyncio.to_thread(read)
