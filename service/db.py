"""Database access: one engine per process, sessions, Alembic migrations, a readiness check."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 15_000
# How long a request may wait for a PostgreSQL connection: to connect (connect_timeout; libpq
# takes whole seconds, at least 2) and again for a free pooled one (pool_timeout). The
# gateway takes it from BITSERVE_DB_TIMEOUT_SECONDS (docs/operations.md, "Database loss").
DEFAULT_TIMEOUT_SECONDS = 5.0
MIN_CONNECT_TIMEOUT_SECONDS = 2

# What the database being down (restarting, unreachable, out of connections) looks like to
# SQLAlchemy, as opposed to a query being wrong: the web layer answers these 503
# `database_unavailable` with Retry-After (service.http_errors), never 500.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    sa.exc.OperationalError,  # connection refused or lost, server shutting down or starting
    sa.exc.InterfaceError,  # a connection the driver already knows is closed
    sa.exc.DisconnectionError,  # pre-ping could not get a live connection
    sa.exc.TimeoutError,  # no pooled connection free within pool_timeout
)


def create_engine(url: str, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> sa.Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # pre_ping: a PostgreSQL restart must not poison pooled connections (each checkout
        # tests its connection and reconnects); the timeouts bound how long a request waits
        # while the server is gone, so it gets a 503 instead of hanging.
        connect = {"connect_timeout": max(MIN_CONNECT_TIMEOUT_SECONDS, math.ceil(timeout_seconds))}
        return sa.create_engine(
            url, pool_pre_ping=True, pool_timeout=timeout_seconds, connect_args=connect
        )
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 15})

    @sa.event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets the gateway read while a worker process writes; busy_timeout makes writers
        # wait for each other instead of failing with "database is locked".
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


class Database:
    """The engine and session factory of one process (built once, never per request)."""

    def __init__(self, url: str, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.url = url
        self.engine = create_engine(url, timeout_seconds)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits when the block ends normally and rolls back on error."""
        with self.sessionmaker() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @contextmanager
    def request_session(self) -> Iterator[Session]:
        """A session for one request; routes commit explicitly, the rest is rolled back.

        Closing it never raises for a lost database: it is closed after the route returned,
        when the answer (a 200, or a 503 for the outage) may already be on its way, and an
        error there would cut that answer off. The dead connection is discarded instead.
        """
        session = self.sessionmaker()
        try:
            yield session
        finally:
            try:
                session.close()
            except UNAVAILABLE_ERRORS as exc:
                log.warning("database: closing a session failed (%s)", type(exc).__name__)
                with suppress(Exception):
                    session.invalidate()

    def check(self) -> None:
        """Raise if the database does not answer a trivial query."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def migrate(self) -> None:
        migrate(self.url)

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config(str(MIGRATIONS_DIR.parent / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not a main option: ConfigParser would treat "%" in a password
    # as interpolation.
    config.attributes["database_url"] = url
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Bring the schema at `url` up to `revision` (Alembic upgrade), SQLite or PostgreSQL."""
    from alembic import command

    # The migration environment connects through create_engine, which also creates a SQLite
    # file's parent folder.
    command.upgrade(alembic_config(url), revision)
