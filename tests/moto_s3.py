"""A standalone S3 server for tests: moto's own (`python -m moto.server`), a real HTTP endpoint
on a free loopback port, reached through boto3 exactly as a MinIO or AWS endpoint would be."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

STARTUP_TIMEOUT_S = 30.0
# Dummy credentials: moto accepts any; boto3 refuses to sign without some.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def moto_server(log_dir: Path) -> Iterator[str]:
    """Run moto's S3 server; yields its endpoint URL."""
    port = _free_port()
    log_path = log_dir / f"moto-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=1.0)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start:\n{log_path.read_text()}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def new_bucket() -> str:
    """A fresh bucket on the endpoint in the environment (AWS_ENDPOINT_URL)."""
    import boto3

    name = f"bitserve-{uuid.uuid4().hex[:12]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=name)
    return name


def use_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """boto3's standard settings, for this process and every child it starts, point at
    `endpoint` with the dummy credentials."""
    for name, value in {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(name, value)
