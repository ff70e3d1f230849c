"""The test suite's own service discovery (tests/services.py) fails with a usable message."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests import services
from tests.services import PrivateServers, ServiceUnavailable


def test_a_failing_initdb_is_reported_with_its_output_and_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "initdb"
    fake.write_text("#!/bin/sh\necho 'initdb: disk full' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name: str(fake) if name != "runuser" else None)
    monkeypatch.setattr(services.os, "geteuid", lambda: 1000)  # no runuser needed
    servers = PrivateServers()
    try:
        with pytest.raises(ServiceUnavailable) as failure:
            servers.start_postgres()
    finally:
        servers.close()
    message = str(failure.value)
    assert message.startswith("initdb failed (exit 3): initdb: disk full")
    assert "docker compose up -d redis postgres" in message


def test_missing_binaries_say_how_to_get_the_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(services, "_pg_bin", lambda name: None)
    servers = PrivateServers()
    try:
        with pytest.raises(ServiceUnavailable, match="redis-server is not installed"):
            servers.start_redis()
        with pytest.raises(ServiceUnavailable, match="initdb/pg_ctl are not installed"):
            servers.start_postgres()
    finally:
        servers.close()
