"""Fixtures of the database-loss and gateway-restart chaos tests: a private PostgreSQL cluster
that a test may stop and start, `bitserve api` as a real process, a published tiny model, and a
load that records every request it sends."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bitcore.models import create_model
from service.db import Database
from service.settings import Settings
from service.storage import Storage
from tests.imagegen import class_image, encode
from tests.integration.worker_fixtures import REPO_ROOT, settings_env
from tests.model_fixtures import publish_model
from tests.services import ServiceUnavailable, _free_port, _pg_bin

CLASSES = ["ant", "bee", "cat"]
API_READY_TIMEOUT_S = 60.0


class PostgresCluster:
    """A PostgreSQL cluster of this test alone (initdb + pg_ctl on a free port): the only kind
    a chaos test may stop. As root, the server runs as the postgres user (runuser)."""

    def __init__(self) -> None:
        initdb = shutil.which("initdb") or _pg_bin("initdb")
        pg_ctl = shutil.which("pg_ctl") or _pg_bin("pg_ctl")
        if not (initdb and pg_ctl):
            raise ServiceUnavailable("initdb/pg_ctl are not installed (PostgreSQL server)")
        self.pg_ctl = pg_ctl
        # Not under pytest's tmp_path: its parents are private to root, and the server runs as
        # the postgres user.
        self.tmp = tmp = Path(tempfile.mkdtemp(prefix="bitserve-chaos-pg-"))
        self.data = tmp / "pgdata"
        self.port = _free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            self.prefix = ["runuser", "-u", "postgres", "--"]
            shutil.chown(tmp, "postgres")
        self._run([*self.prefix, initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust"])
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, command: list[str]) -> None:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.tmp / "pg.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ServiceUnavailable(f"{command[-1]} failed: {result.stderr} {tail}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.tmp} -h 127.0.0.1"
        log = str(self.tmp / "pg.log")
        command = [self.pg_ctl, "-D", str(self.data), "-o", options, "-l", log, "-w", "-t", "60"]
        self._run([*self.prefix, *command, "start"])

    def stop(self, mode: str = "fast") -> None:
        self._run([*self.prefix, self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop"])

    def close(self) -> None:
        subprocess.run(
            [*self.prefix, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(self.tmp, ignore_errors=True)


class ApiProcess:
    """`bitserve api` (python -m service.cli api) as a child process, output in a log file."""

    def __init__(self, settings: Settings, port: int, log_path: Path) -> None:
        self.settings = settings
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ApiProcess:
        env = settings_env(self.settings)
        env["OMP_NUM_THREADS"] = "1"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "api", "--port", str(self.port)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + API_READY_TIMEOUT_S
        while "Application startup complete" not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"bitserve api exited ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"bitserve api not up in {API_READY_TIMEOUT_S} s:\n{self.log()}")
            time.sleep(0.1)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def publish_tiny_model(db: Database, storage: Storage) -> str:
    torch.manual_seed(0)
    model = create_model("tiny-R10x0.25", len(CLASSES))
    model_id, _ = publish_model(db, storage, model, "tiny-R10x0.25", CLASSES, 32)
    return model_id


def png(seed: int = 0) -> bytes:
    return encode(class_image(seed % 3, 3, (40, 48), seed=seed), "PNG")


@dataclass
class Outcome:
    """One request of a load: when it was sent, how long it took, what came back."""

    kind: str
    started: float
    seconds: float
    status: int | None  # None: no answer (the exception's name is in `error`)
    code: str | None = None
    retry_after: str | None = None
    error: str | None = None


@dataclass
class Load:
    """Threads that each call `send` in a loop until stopped, recording every Outcome."""

    send: Callable[[int], Outcome]
    threads: int
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _loop(self, index: int) -> None:
        i = index
        while not self._stop.is_set():
            outcome = self.send(i)
            with self._lock:
                self.outcomes.append(outcome)
            i += self.threads

    def __enter__(self) -> Load:
        for index in range(self.threads):
            worker = threading.Thread(target=self._loop, args=(index,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(60)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)
