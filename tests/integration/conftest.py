"""Shared integration fixtures: a migrated PostgreSQL, Settings on it, a real HTTP server.

`live_server` is a real uvicorn serving `create_app(settings)` on a free loopback port (in a
thread of the test process, so tests can also reach `server.app.state`), with a real Celery
ingest worker on the same settings (uploads become ready datasets, as in production);
`client` is an httpx.Client on it, sending the server's admin key (API keys are required, as
in production: each LiveServer makes a global admin key of tenant "default" when it starts).
`start_server(settings)` starts more servers with other settings (e.g. a small upload limit)
and stops them when the test ends; `ingest=True` gives one its own ingest worker.
tests/integration/datasets_helpers.py uploads and waits for the dataset to be ingested.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from service import api_keys
from service.api_keys import DEFAULT_TENANT, Scope
from service.app import create_app
from service.db import Database, migrate
from service.settings import Settings
from tests.integration.worker_fixtures import (
    TESTS_MAX_ACTIVE_JOBS,
    WorkerProcess,
    fast_job_settings,
)
from tests.moto_s3 import moto_server, use_endpoint
from tests.services import create_database, drop_database

STARTUP_TIMEOUT_S = 30.0


class LiveServer:
    """uvicorn in a background thread, on a socket bound before it starts (no port race)."""

    def __init__(
        self,
        settings: Settings,
        *,
        with_key: bool = True,
        ingest: bool = False,
        **uvicorn_options: Any,
    ) -> None:
        self.settings = settings
        self.with_key = with_key
        # A Celery worker on the settings' ingest queue, started and stopped with the server.
        self.ingest_worker = WorkerProcess(settings, roles=("ingest",)) if ingest else None
        self.key = ""
        self.headers: dict[str, str] = {}
        self.app: FastAPI = create_app(settings)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        # uvicorn_options: e.g. service.connections.connection_options(settings), as
        # `bitserve api` serves (tests/integration/test_connections.py).
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=5,
            **uvicorn_options,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="uvicorn"
        )

    def start(self) -> LiveServer:
        if self.ingest_worker is not None:
            self.ingest_worker.start()
        if self.with_key:
            self.key = make_key(self.app.state.db, self.settings, global_admin=True)
            self.headers = {"Authorization": f"Bearer {self.key}"}
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during start-up (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start within {STARTUP_TIMEOUT_S} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
        if self.ingest_worker is not None:
            self.ingest_worker.stop()


def make_key(
    db: Database,
    settings: Settings,
    tenant: str = DEFAULT_TENANT,
    scopes: tuple[Scope, ...] = (Scope.ADMIN,),
    **options: Any,
) -> str:
    """A new API key (the token) of `tenant`, made as `bitserve keys create` makes it."""
    with db.sessionmaker() as session:
        made = api_keys.create_key(
            session, tenant_id=tenant, scopes=scopes, pepper=settings.pepper, **options
        )
    return made.token


def make_settings(home: Path, database_url: str, broker_url: str, **overrides: object) -> Settings:
    values: dict[str, Any] = {
        "auto_migrate": False,  # migrated once per session by `migrated_db`
        # A queue of its own: only this server's ingest worker (if any) takes its uploads.
        "ingest_queue": f"ingest-{uuid.uuid4().hex[:8]}",
        "tenant_max_active_jobs": TESTS_MAX_ACTIVE_JOBS,  # test_quotas.py sets its own
        **overrides,
    }
    return Settings(home=home, database_url=database_url, broker_url=broker_url, **values)


@pytest.fixture
def s3_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server, and the AWS settings every process of the test reads (boto3's own)."""
    with moto_server(tmp_path) as endpoint:
        use_endpoint(monkeypatch, endpoint)
        yield endpoint


@pytest.fixture(scope="session")
def migrated_db(postgres_url: str) -> str:
    """The session's PostgreSQL database, at the latest schema (Alembic upgrade head)."""
    migrate(postgres_url)
    return postgres_url


@pytest.fixture(scope="module")
def own_database(postgres_admin_url: str) -> Iterator[str]:
    """A migrated PostgreSQL database for this module alone, dropped after it.

    For tests that kill workers and wait for a repair: every worker's reconciler repairs the
    jobs (and evaluations, batch predictions) of its whole database and re-sends them to its
    own queues. On the session's database the session server's ingest worker, whose queues are
    not the module's private ones, could take a killed worker's job back first and send it
    where no worker of the test listens (seen once in CI)."""
    url, name = create_database(postgres_admin_url)
    try:
        migrate(url)
        yield url
    finally:
        drop_database(postgres_admin_url, name)


@pytest.fixture(scope="session")
def settings(
    migrated_db: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    """Settings for the session's server: real PostgreSQL and Redis, files in a temp home."""
    return make_settings(tmp_path_factory.mktemp("bitserve-home"), migrated_db, redis_url)


@pytest.fixture(scope="session")
def live_server_instance(settings: Settings) -> Iterator[LiveServer]:
    server = LiveServer(settings, ingest=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def live_server(live_server_instance: LiveServer) -> str:
    """Base URL of a real uvicorn serving create_app(settings)."""
    return live_server_instance.url


@pytest.fixture
def client(live_server: str, live_server_instance: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=live_server, timeout=60, headers=live_server_instance.headers
    ) as http:
        yield http


@pytest.fixture
def start_server() -> Iterator[Callable[..., LiveServer]]:
    """Start extra servers with their own settings; all stopped at the end of the test."""
    started: list[LiveServer] = []

    def start(
        settings: Settings, *, with_key: bool = True, ingest: bool = False, **uvicorn_options: Any
    ) -> LiveServer:
        server = LiveServer(settings, with_key=with_key, ingest=ingest, **uvicorn_options)
        started.append(server)  # stopped at the end even if start() fails halfway
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@dataclass
class JobServer:
    """A live API server and a real Celery worker on the server's own train queue."""

    server: LiveServer
    worker: WorkerProcess


@contextmanager
def running_job_server(home: Path, database_url: str, redis_url: str) -> Iterator[JobServer]:
    """A live API and a real solo-pool worker on `database_url` (already migrated)."""
    # Stale only after 30 s: on a loaded CI machine a late heartbeat must not re-queue the job.
    settings = fast_job_settings(
        home, database_url=database_url, broker_url=redis_url, job_stale_after_seconds=30.0
    )
    server = LiveServer(settings).start()
    try:
        with WorkerProcess(settings, pool="solo") as worker:
            yield JobServer(server, worker)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def job_server(
    tmp_path_factory: pytest.TempPathFactory, migrated_db: str, redis_url: str
) -> Iterator[JobServer]:
    with running_job_server(tmp_path_factory.mktemp("jobs"), migrated_db, redis_url) as both:
        yield both
