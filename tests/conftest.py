"""Session-wide fixtures: real Redis and PostgreSQL (found or started, never skipped)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from tests.services import PrivateServers, create_database, drop_database, find_postgres, find_redis

# Two cores are shared by the test process and the Celery workers and servers it starts; the
# tests' models are tiny, so one intra-op thread each is fastest (thread overhead dominates).
torch.set_num_threads(1)
# The same figure for what sizes itself from bitcore.cpus (a ModelCache's torch and ONNX
# Runtime threads, decode pools), here and in the processes the tests start: a served model's
# scores are then computed with the thread count of the reference they are compared with.
os.environ.setdefault("BITSERVE_CPUS", "1")


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that load OpenVINO run last. Its native thread pool stays in the process once
    loaded, and a later test that forks children (tests/unit/test_supervisor.py, Popen with
    preexec_fn) crashed the whole pytest process with SIGSEGV once in three CI runs; nothing
    that forks runs after them this way."""

    def loads_openvino(item: pytest.Item) -> bool:
        return "openvino" in item.nodeid

    items.sort(key=loads_openvino)  # stable: the order is otherwise kept
