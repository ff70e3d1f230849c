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
    settings = Settings(train_queue="gpu", ingest_queue="bulk", worker_concurrency=1)
    command = cli.worker_command(settings)
    assert command[:6] == [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker"]
    assert command[6:11] == ["-Q", "gpu,bulk", "-c", "1", "--pool=solo"]
    assert cli.worker_command(settings, roles=("ingest",))[6:8] == ["-Q", "bulk"]
    assert cli.parse_roles(" ingest, train,ingest") == ("ingest", "train")
    for wrong in ("", "gpu", "train,cpu"):
        with pytest.raises(SystemExit, match="--queues takes train and/or ingest"):
            cli.parse_roles(wrong)
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


def test_keys_create_list_revoke(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service import api_keys
    from service.db import Database

    assert cli.main(["migrate"]) == 0
    capsys.readouterr()
    args = ["keys", "create", "--tenant", "acme", "--scope", "predict", "--scope", "train"]
    assert cli.main([*args, "--name", "ci", "--expires-days", "30"]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[-1]
    assert key.startswith("bsk_") and len(key) == 68
    key_id = f"key_{key[4:24]}"
    assert out[0] == f"created {key_id} for tenant acme: predict,train"

    assert cli.main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "acme" in listing and "active" in listing and "ci" in listing
    assert key not in listing and key[25:] not in listing

    settings = Settings()
    db = Database(settings.database_url)
    with db.sessionmaker() as session:
        principal = api_keys.authenticate(session, key, settings.pepper)
    assert (principal.tenant_id, principal.key_id) == ("acme", key_id)
    assert principal.scopes == {api_keys.Scope.PREDICT, api_keys.Scope.TRAIN}

    assert cli.main(["keys", "revoke", key_id]) == 0
    assert capsys.readouterr().out == f"revoked {key_id} (tenant acme)\n"
    with db.sessionmaker() as session, pytest.raises(api_keys.Unauthenticated, match="revoked"):
        api_keys.authenticate(session, key, settings.pepper)
    db.dispose()
    assert cli.main(["keys", "list", "--tenant", "acme"]) == 0
    assert "revoked" in capsys.readouterr().out
    # Mistakes are one line on stderr and exit 2.
    assert cli.main(["keys", "revoke", "key_" + "a" * 20]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["keys", "create", "--tenant", "Bad Name"]) == 2
    assert "tenant name" in capsys.readouterr().err


def test_bitserve_up_makes_its_admin_key_once(home: Path) -> None:
    from service.cli_keys import ensure_admin_key

    assert cli.main(["migrate"]) == 0
    settings = Settings()
    key = ensure_admin_key(settings)
    path = home / "admin.key"
    assert key is not None and path.read_text() == key + "\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert ensure_admin_key(settings) is None  # still valid: kept
    path.write_text("bsk_stale\n")  # e.g. a new database: a new key replaces it
    again = ensure_admin_key(settings)
    assert again is not None and again != key and path.read_text() == again + "\n"


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
    ],
)
def test_auth_off_only_on_loopback(host: str, allowed: bool, tmp_path: Path) -> None:
    from service.auth import check_auth_setting

    settings = Settings(home=tmp_path, host=host, auth="off")
    if allowed:
        check_auth_setting(settings)
    else:
        with pytest.raises(SystemExit, match="BITSERVE_AUTH=off is refused"):
            check_auth_setting(settings)
    check_auth_setting(Settings(home=tmp_path, host=host))  # required: anywhere
