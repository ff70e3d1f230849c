"""FastAPI dependencies (Annotated): settings, database, session, storage, broker, caller.

Everything comes from app.state, built once by create_app, so tests can run several apps with
different settings in one process.

The dependencies that only read app.state or request.state are `async def`: FastAPI runs a
plain `def` dependency in the thread pool, and each such hop cost the predict path about as
much CPU as the rest of the dependency (benchmarks/RESULTS.md, "Gateway overhead per request").
get_session stays a plain generator: closing a session may wait on the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session

from service.api_keys import Principal
from service.auth import principal_of
from service.broker import Broker
from service.db import Database
from service.settings import Settings
from service.storage import Storage


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


async def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


async def get_broker(request: Request) -> Broker:
    """The app's Celery client (service.broker; the gateway never imports the worker)."""
    broker: Broker = request.app.state.broker
    return broker


def get_session(db: Annotated[Database, Depends(get_db)]) -> Iterator[Session]:
    """A session for one request. Routes commit explicitly; anything uncommitted is rolled back."""
    with db.request_session() as session:
        yield session


async def get_principal(request: Request) -> Principal:
    """The caller, as authenticated by the route's authorize() dependency (service.auth)."""
    return principal_of(request)


async def get_tenant(principal: Annotated[Principal, Depends(get_principal)]) -> str:
    """The caller's tenant: every query of a request filters by it."""
    return principal.tenant_id


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
# ?tenant= on an admin's lists (keys, audit events): only a global admin may name another.
TenantQuery = Annotated[str | None, Query(max_length=64, description="a global admin's filter")]
DbDep = Annotated[Database, Depends(get_db)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]
BrokerDep = Annotated[Broker, Depends(get_broker)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
TenantDep = Annotated[str, Depends(get_tenant)]
