"""Chaos tests: real processes killed, restarted or starved while the service works.

Every test here is marked `chaos` (run them alone with `pytest -m chaos`). Faults are only ever
injected into servers and processes a test started itself (private redis-server, private
PostgreSQL cluster, its own `bitserve` processes): the shared local Redis and PostgreSQL are
never restarted.
"""

from __future__ import annotations

import pytest

# The integration fixtures (migrated PostgreSQL, settings, live servers) are used here too.
from tests.integration.conftest import migrated_db, settings  # noqa: F401


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/chaos/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.chaos)
            item.add_marker(pytest.mark.integration)
