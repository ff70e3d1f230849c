"""`bitserve` (service.cli): migrate, the worker command line, refusing a busy port.

`bitserve up` itself (API + worker, Ctrl-C) is exercised end to end in tests/e2e/test_embedded.py.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from service import cli
from service.settings import Settings, get_settings


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BITSERVE_HOME", str(tmp_path / "home"))
    # cli.main writes --host/--port into os.environ (for its children): monkeypatch restores.
    monkeypatch.setenv("BITSERVE_HOST", "127.0.0.1")
    monkeypatch.setenv("BITSERVE_PORT", "8000")
    yield tmp_path / "home"
    get_settings.cache_clear()


def test_migrate_creates_the_embedded_database(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["migrate"]) == 0
    database = home / "bitserve.db"
    assert f"database is up to date: sqlite:///{database}" in capsys.readouterr().out
    engine = sa.create_engine(f"sqlite:///{database}")
    tables = set(sa.inspect(engine).get_table_names())
    engine.dispose()
    assert {"datasets", "jobs", "models"} <= tables


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    for command in ("up", "api", "worker", "migrate"):
        assert command in out


def test_worker_command_and_environment(home: Path) -> None:
    settings = Settings(train_queue="gpu", worker_concurrency=1)
    command = cli.worker_command(settings)
    assert command[:6] == [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker"]
    assert command[6:11] == ["-Q", "gpu", "-c", "1", "--pool=solo"]
    assert "--pool=prefork" in cli.worker_command(Settings(worker_concurrency=2))
    env = cli.child_environment(settings)
    assert env["BITSERVE_HOME"] == str(home.resolve())  # absolute: children see the same paths


def test_up_refuses_a_busy_port(home: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}"):
            cli.main(["up", "--port", str(port)])
    assert not (home / "bitserve.db").exists()  # nothing started, nothing written


def test_redact_hides_passwords() -> None:
    assert cli._redact("postgresql://bit:secret@db:5432/bitserve") == (
        "postgresql://bit:***@db:5432/bitserve"
    )
    assert cli._redact("redis://:secret@cache:6379/0") == "redis://***@cache:6379/0"
    assert cli._redact("sqla+sqlite:////x/broker.db") == "sqlite:////x/broker.db"
