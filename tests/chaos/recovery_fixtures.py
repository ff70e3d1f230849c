"""Processes the recovery chaos tests start, watch and kill: `bitserve up` with its log, the
process tree under it, a private redis-server that can be SIGKILLed and restarted empty on the
same port, and a poller that checks the API keeps answering while a fault is on."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

from tests.procs import children, embedded_env

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, log: Callable[[], str] = str
) -> float:
    """Poll `check` until it holds; returns the seconds it took, fails saying `what` if not."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s\n{log()[-6000:]}")


class UpProcess:
    """`bitserve up` (embedded: SQLite, SQLAlchemy broker, store under BITSERVE_HOME) as a
    child process with its output in a log file; `extra_env` adds BITSERVE_* settings."""

    def __init__(self, home: Path, extra_env: Mapping[str, str]) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home.parent / "bitserve-up.log"
        env = embedded_env(home, self.port, BITSERVE_ALLOW_DOWNLOADS="false", **extra_env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "up"],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"bitserve up exited ({self.proc.returncode}):\n{self.log()}")
            try:
                ok = httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                ok = False
            # The worker says "ready." once it consumes: only then are jobs picked up.
            return ok and "bitserve is up" in self.log() and "ready." in self.log()

        wait_until(ready, timeout, "bitserve up ready", self.log)

    def worker_pid(self, role: str = "train") -> int | None:
        """The pid of the Celery worker of `role` ("train" or "ingest": `bitserve up` runs
        one of each), known by the name service.cli.worker_command gives it."""
        found = []
        for pid in children(self.proc.pid):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:  # it exited meanwhile
                continue
            if any(part.startswith(f"bitserve-{role}-".encode()) for part in command):
                found.append(pid)
        return found[0] if len(found) == 1 else None

    def kill_all(self) -> None:
        for pid in children(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class PrivateRedis:
    """A redis-server of this test only, without persistence: SIGKILL loses everything."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (apt-get install redis-server)"
        self.binary, self.directory = binary, directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.answers, 20, f"redis-server on port {self.port}")

    def answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except Exception:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stored_keys(self) -> list[bytes]:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=2)
        try:
            return list(client.keys("*"))
        finally:
            client.close()


class Poller:
    """Calls `probe` every `interval` s in a thread; records (time, outcome) for each call."""

    def __init__(self, probe: Callable[[], str], interval: float = 0.25) -> None:
        self.probe, self.interval = probe, interval
        self.results: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                outcome = self.probe()
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            self.results.append((time.monotonic(), outcome))
            self._stop.wait(self.interval)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def failures(self) -> list[str]:
        return [outcome for _, outcome in self.results if outcome != "ok"]
