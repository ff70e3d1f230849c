"""Fuzz tests: schemathesis against the live OpenAPI schema of a real bitserve server.

Every test here is marked `fuzz` and `integration` (run them alone with `pytest -m fuzz`).
The server under fuzz has a database of its own (a fresh PostgreSQL database, migrated) and a
private train queue, so what the fuzzer creates, deletes or re-quotas never reaches the other
integration tests, which share the session's database.
"""

from __future__ import annotations

import pytest

# The fuzz server uses the session's PostgreSQL and Redis fixtures (tests/conftest.py).


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/fuzz/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.fuzz)
            item.add_marker(pytest.mark.integration)
