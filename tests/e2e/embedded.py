"""`bitserve up` as a child process on embedded defaults, for the end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.procs import descendants, embedded_env

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0  # generous for a loaded 2-core CI machine; typically a few seconds


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Up:
    """`bitserve up` as a child process, its output in a log file."""

    def __init__(self, home: Path, *, cwd: Path = REPO_ROOT) -> None:
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home.parent / "bitserve-up.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "up"],
                cwd=cwd,
                env=embedded_env(home, self.port),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"bitserve up exited ({self.proc.returncode}):\n{self.log()}")
            try:
                ready = httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                ready = False
            # The banner is printed by a watcher thread just after uvicorn reports it listens,
            # so it may trail the first 200 from /readyz by a moment.
            if ready and "bitserve is up" in self.log():
                return
            time.sleep(0.3)
        raise AssertionError(f"/readyz not 200 within {READY_TIMEOUT_S} s:\n{self.log()}")

    def kill(self) -> None:
        for pid in descendants(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
