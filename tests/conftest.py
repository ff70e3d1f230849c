"""Session-wide fixtures: real Redis and PostgreSQL (found or started, never skipped)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from tests.services import PrivateServers, create_database, drop_database, find_postgres, find_redis

# Two cores are shared by the test process, Celery workers and uvicorn servers it starts.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def private_servers() -> Iterator[PrivateServers]:
    servers = PrivateServers()
    yield servers
    servers.close()


@pytest.fixture(scope="session")
def redis_url(private_servers: PrivateServers) -> str:
    return find_redis(private_servers)


@pytest.fixture(scope="session")
def postgres_admin_url(private_servers: PrivateServers) -> str:
    return find_postgres(private_servers)


@pytest.fixture(scope="session")
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh database for this test session, dropped afterwards."""
    url, name = create_database(postgres_admin_url)
    yield url
    drop_database(postgres_admin_url, name)
