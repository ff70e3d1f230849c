"""A database that cannot be reached is a 503 database_unavailable with Retry-After, wherever
the request meets it (here: the API key check), within the stated connect timeout."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

from service.api_keys import ID_LENGTH, KEY_PREFIX
from service.app import create_app
from service.settings import Settings
from tests.services import _free_port


def test_an_unreachable_database_answers_503_database_unavailable(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there: every connection is refused
    settings = Settings(
        home=tmp_path,
        database_url=f"postgresql://postgres@127.0.0.1:{port}/bitserve",
        broker_url="memory://",
        auto_migrate=False,
        db_timeout_seconds=2.0,
    )
    client = TestClient(
        create_app(settings), base_url="http://localhost", raise_server_exceptions=False
    )
    started = time.monotonic()
    # Well-formed, so it is looked up in the database.
    token = f"{KEY_PREFIX}{'a' * ID_LENGTH}_{'s' * 43}"
    response = client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "5"
    error = response.json()["error"]
    assert error["code"] == "database_unavailable"
    assert "retry" in error["message"]
    assert "127.0.0.1" not in response.text  # no connection details reach the client
    assert elapsed < 2.0 + 3.0
