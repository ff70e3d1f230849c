"""The Docker image and compose file, checked without a Docker engine (none runs in CI).

hadolint and `docker-compose config` run in `make lint-deploy`; these tests check that what the
files run exists: every `bitserve ...` command parses with the real CLI, the health check's
route is served, and every environment variable they set is one the Settings read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import redis
import sqlalchemy as sa
import yaml

from service.app import create_app
from service.cli import _parser, parse_roles
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


def test_compose_trains_and_ingests_in_separate_workers() -> None:
    # A worker takes one task at a time: an upload must not wait behind a training job.
    services = COMPOSE["services"]
    queues = {
        name: parse_roles(_parser().parse_args(services[name]["command"][1:]).queues)
        for name in ("worker", "worker-gpu", "ingest-worker")
    }
    assert queues == {"worker": ("train",), "worker-gpu": ("train",), "ingest-worker": ("ingest",)}


def test_healthcheck_route_exists(tmp_path: Path) -> None:
    assert "http://127.0.0.1:8000/healthz" in DOCKERFILE
    app = create_app(Settings(home=tmp_path))
    assert "get" in app.openapi()["paths"]["/healthz"]


# A secret with the characters a URL must escape, as `openssl rand -base64` can produce.
SECRET = "s3:cr/t@p+w=d%"


def secret_files(tmp_path: Path) -> dict[str, str]:
    """/run/secrets/<name> -> a local file holding SECRET + <name> (the container's paths are
    not writable here)."""
    mapping = {}
    for name in COMPOSE["secrets"]:
        local = tmp_path / "secrets" / name
        local.parent.mkdir(exist_ok=True)
        local.write_text(f"{SECRET}{name}\n")  # a trailing newline, as `openssl rand` writes
        mapping[f"/run/secrets/{name}"] = str(local)
    return mapping


def test_compose_environment_is_read_by_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = dict(COMPOSE["x-bitserve-env"])
    env["BITSERVE_HOME"] = str(tmp_path)  # the container's /data is not writable here
    env["BITSERVE_CHECKPOINT_DIR"] = str(tmp_path / "checkpoints")
    secrets = secret_files(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, secrets.get(value, value))
    settings = Settings()
    # The passwords come from the secret files into the URLs, percent-encoded.
    database = sa.engine.make_url(settings.database_url)
    assert database.password == f"{SECRET}postgres_password"
    assert database.render_as_string(hide_password=True) == env["DATABASE_URL"].replace(
        "bitserve@", "bitserve:***@"
    )
    broker = urlsplit(settings.broker_url)
    assert unquote(broker.password or "") == f"{SECRET}redis_password"
    assert (broker.hostname, broker.port, broker.path) == ("redis", 6379, "/0")
    assert settings.pepper == f"{SECRET}api_key_pepper".encode()
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


# -- issue 11: compose hardening, the image's pinned base and locked install ------------------


def test_compose_publishes_ports_on_loopback_only() -> None:
    published = {
        name: svc.get("ports", []) for name, svc in COMPOSE["services"].items() if "ports" in svc
    }
    assert set(published) == {"postgres", "redis", "minio", "gateway"}
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_every_compose_service_has_a_memory_limit() -> None:
    limits = {name: svc.get("mem_limit") for name, svc in COMPOSE["services"].items()}
    assert all(re.fullmatch(r"\d+[mg]", str(limit)) for limit in limits.values()), limits


def test_compose_keeps_no_password_in_plain_text() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "POSTGRES_PASSWORD:" not in text
    assert "BITSERVE_API_KEY_PEPPER:" not in text
    for url in (
        COMPOSE["x-bitserve-env"]["DATABASE_URL"],
        COMPOSE["x-bitserve-env"]["CELERY_BROKER_URL"],
    ):
        assert urlsplit(url).password is None, url
    assert COMPOSE["services"]["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == (
        "/run/secrets/postgres_password"
    )
    # Every secret is a git-ignored file, and every container reading one mounts it.
    assert {name: spec["file"] for name, spec in COMPOSE["secrets"].items()} == {
        name: f"./secrets/{name}"
        for name in (
            "postgres_password",
            "redis_password",
            "api_key_pepper",
            "minio_root_user",
            "minio_root_password",
            "s3_credentials",
        )
    }
    assert "/secrets/" in (ROOT / ".gitignore").read_text().split()
    minio = COMPOSE["services"]["minio"]["environment"]
    assert minio == {
        "MINIO_ROOT_USER_FILE": "/run/secrets/minio_root_user",
        "MINIO_ROOT_PASSWORD_FILE": "/run/secrets/minio_root_password",
    }
    for name, svc in COMPOSE["services"].items():
        environment = svc.get("environment") or {}
        wanted = {
            value.removeprefix("/run/secrets/")
            for value in environment.values()
            if str(value).startswith("/run/secrets/")
        }
        command = " ".join(svc.get("command") or [])
        wanted |= set(re.findall(r"/run/secrets/(\w+)", command))
        assert wanted <= set(svc.get("secrets") or []), name


def test_compose_redis_refuses_clients_without_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compose file's own Redis command and health check, run on a local redis-server
    (the secret's path swapped for a local file), against the URL bitserve's settings build."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed (tests/services.py says how to get it)")
    secrets = secret_files(tmp_path)
    service = COMPOSE["services"]["redis"]

    def local(shell: str) -> str:
        shell = shell.replace("$$", "$")  # compose's escape for a literal $
        for container_path, local_path in secrets.items():
            shell = shell.replace(container_path, local_path)
        return shell

    assert service["command"][:2] == ["sh", "-c"]
    port = _free_port()
    # A session of its own: `sh -c` may fork redis-server rather than exec it, and the whole
    # group is stopped at the end (a terminated shell alone left redis-server running).
    server = subprocess.Popen(
        ["sh", "-c", local(service["command"][2]) + f" --port {port} --dir {tmp_path}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        anonymous = redis.Redis(port=port, socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                anonymous.ping()
            except redis.exceptions.AuthenticationError:
                break  # up, and refusing us: what we want
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
            else:
                pytest.fail("Redis answered a client without the password")
        monkeypatch.setenv("BITSERVE_HOME", str(tmp_path))
        monkeypatch.setenv("CELERY_BROKER_URL", f"redis://127.0.0.1:{port}/0")
        monkeypatch.setenv("BITSERVE_BROKER_PASSWORD_FILE", secrets["/run/secrets/redis_password"])
        assert redis.Redis.from_url(Settings().broker_url).ping() is True
        health = service["healthcheck"]["test"]
        assert health[0] == "CMD-SHELL"
        check = local(health[1]).replace("redis-cli", f"redis-cli -p {port}")
        assert subprocess.run(["sh", "-c", check], timeout=10).returncode == 0
        wrong = re.sub(r"\$\(cat [^)]*\)", "wrong-password", check)
        assert wrong != check
        assert subprocess.run(["sh", "-c", wrong], timeout=10).returncode != 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_password_files_replace_a_password_in_the_url(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("n3w/p@ss\r\n")
    settings = Settings(
        home=tmp_path,
        database_url="postgresql+psycopg://user:old@db:5432/x",
        database_password_file=secret,
    )
    assert settings.database_url == "postgresql+psycopg://user:n3w%2Fp%40ss@db:5432/x"
    secret.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        Settings(home=tmp_path, broker_url="redis://r:6379/0", broker_password_file=secret)


def test_the_image_base_is_pinned_by_digest_and_installs_the_lock() -> None:
    base = re.search(r"^FROM (\S+)", DOCKERFILE, re.M)
    assert base is not None
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w-]*@sha256:[0-9a-f]{64}", base.group(1))
    assert "COPY requirements.lock ./" in DOCKERFILE
    assert "pip install --require-hashes --no-deps -r requirements.lock" in DOCKERFILE
    assert "pip install --no-deps --no-build-isolation . && pip check" in DOCKERFILE
    assert os.path.exists(ROOT / "requirements.lock")


# -- issue 12: the S3-compatible service -----------------------------------------------------


def test_compose_runs_an_object_store_the_bitserve_containers_wait_for() -> None:
    services = COMPOSE["services"]
    image = services["minio"]["image"]
    # Pinned to a release: a moving tag could change the server under a running deployment.
    assert re.fullmatch(r"minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", image)
    assert services["minio-init"]["image"] == image
    assert "mc mb --ignore-existing local/bitserve" in services["minio-init"]["entrypoint"][2]
    env = COMPOSE["x-bitserve-env"]
    assert urlsplit(env["AWS_ENDPOINT_URL"]).netloc == "minio:9000"
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == "/run/secrets/s3_credentials"
    for name in ("gateway", "worker", "worker-gpu", "ingest-worker"):
        assert services[name]["depends_on"]["minio-init"] == {
            "condition": "service_completed_successfully"
        }
    # The header's recipe writes the credentials file boto3 reads from the MinIO root secrets.
    header = (ROOT / "docker-compose.yml").read_text().split("x-bitserve-env")[0]
    assert "minio_root_user minio_root_password" in header
    assert "> secrets/s3_credentials" in header


def test_the_header_recipe_makes_the_secret_files(tmp_path: Path) -> None:
    """The commands in docker-compose.yml's header, run: every secret file the compose file
    names exists, and boto3's credentials file holds MinIO's root user and password."""
    import configparser

    lines = (ROOT / "docker-compose.yml").read_text().split("x-bitserve-env")[0].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#   mkdir -p secrets"))
    recipe = []
    for line in lines[start:]:
        recipe.append(line.removeprefix("#   "))
        if line.rstrip().endswith("chmod 600 secrets/*"):
            break
    subprocess.run(["sh", "-ec", "\n".join(recipe)], cwd=tmp_path, check=True, timeout=30)
    for spec in COMPOSE["secrets"].values():
        made = tmp_path / spec["file"]
        assert made.stat().st_size > 0 and made.stat().st_mode & 0o777 == 0o600
    credentials = configparser.ConfigParser()
    credentials.read(tmp_path / "secrets" / "s3_credentials")
    read = (tmp_path / "secrets").joinpath
    assert (
        credentials["default"]["aws_access_key_id"] == read("minio_root_user").read_text().strip()
    )
    assert credentials["default"]["aws_secret_access_key"] == (
        read("minio_root_password").read_text().strip()
    )
