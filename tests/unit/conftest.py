"""Fixtures of the job state-machine tests (test_jobs_state.py, test_job_runs.py): a migrated
SQLite and PostgreSQL database each (every test starts from empty tables), and settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from service.db import Database, migrate
from service.settings import Settings
from service.tables import Dataset, Deployment, Job, Model, Tenant
from tests.services import create_database, drop_database


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('jobs-db') / 'bitserve.db'}"
        dropper = None
    else:
        admin = request.getfixturevalue("postgres_admin_url")
        url, name = create_database(admin)
        dropper = (admin, name)
    migrate(url)
    db = Database(url)
    yield db
    db.dispose()
    if dropper:
        drop_database(*dropper)


@pytest.fixture
def db(database: Database) -> Database:
    with database.sessionmaker() as session:  # each test starts from empty tables
        # Deployments first: their targets keep models from being deleted.
        for table in (Deployment, Model, Job, Dataset, Tenant):
            session.execute(sa.delete(table))
        session.commit()
    return database


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path,
        job_max_attempts=2,
        job_stale_after_seconds=60,
        job_resend_after_seconds=600,
    )
