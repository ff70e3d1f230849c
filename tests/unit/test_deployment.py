"""The Docker image and compose file, checked without a Docker engine (none runs in CI).

hadolint and `docker-compose config` run in `make lint-deploy`; these tests check that what the
files run exists: every `bitserve ...` command parses with the real CLI, the health check's
route is served, and every environment variable they set is one the Settings read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from service.app import create_app
from service.cli import _parser
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def bitserve_commands() -> list[tuple[str, list[str]]]:
    found = [
        (name, svc["command"])
        for name, svc in COMPOSE["services"].items()
        if isinstance(svc.get("command"), list) and svc["command"][0] == "bitserve"
    ]
    cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.M)
    assert cmd is not None
    found.append(("Dockerfile CMD", json.loads(cmd.group(1))))
    return found


def test_the_deployment_runs_gateway_worker_and_migrations() -> None:
    subcommands = {cmd[1] for _, cmd in bitserve_commands()}
    assert subcommands == {"api", "worker", "migrate"}


@pytest.mark.parametrize(("where", "command"), bitserve_commands())
def test_command_parses_with_the_real_cli(where: str, command: list[str]) -> None:
    args = _parser().parse_args(command[1:])
    assert args.command == command[1], where


def test_healthcheck_route_exists(tmp_path: Path) -> None:
    assert "http://127.0.0.1:8000/healthz" in DOCKERFILE
    app = create_app(Settings(home=tmp_path))
    assert "get" in app.openapi()["paths"]["/healthz"]


def test_compose_environment_is_read_by_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = dict(COMPOSE["x-bitserve-env"])
    env["BITSERVE_HOME"] = str(tmp_path)  # the container's /data is not writable here
    env["BITSERVE_CHECKPOINT_DIR"] = str(tmp_path / "checkpoints")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.database_url == env["DATABASE_URL"]
    assert settings.broker_url == env["CELERY_BROKER_URL"]
    assert settings.home == tmp_path
    assert settings.checkpoint_dir == tmp_path / "checkpoints"
    assert settings.worker_concurrency == int(env["BITSERVE_WORKER_CONCURRENCY"])
    assert settings.train_queue == env["BITSERVE_TRAIN_QUEUE"]


def test_gpu_worker_selects_cuda(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gpu = COMPOSE["services"]["worker-gpu"]
    monkeypatch.setenv("BITSERVE_HOME", str(tmp_path))
    monkeypatch.setenv("BITSERVE_DEVICE", gpu["environment"]["BITSERVE_DEVICE"])
    assert Settings().device == "cuda"
    assert gpu["profiles"] == ["gpu"]
