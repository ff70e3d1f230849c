"""What the benchmark scripts share: a server child process on a loopback socket, the /proc
readings taken of it, and the CPU model name for the table headers.

The script that starts a server runs itself again as the child, with `--serve-fd FD` (the
listening socket, bound here on 127.0.0.1 with port 0, so no port race) followed by its own
arguments; the child must answer GET /healthz with 200 once it serves.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str

    def _proc(self, entry: str) -> str:
        with open(f"/proc/{self.process.pid}/{entry}", encoding="ascii") as fh:
            return fh.read()

    def descendants(self) -> list[int]:
        """The pids of the server's child processes, theirs, and so on (from /proc)."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            stat = _stat(entry) if entry.isdigit() else None
            if stat is not None:
                children.setdefault(int(stat[1]), []).append(int(entry))
        found: list[int] = []
        todo = [self.process.pid]
        while todo:
            kids = children.get(todo.pop(), [])
            found += kids
            todo += kids
        return found

    def cpu_seconds(self) -> float:
        """utime + stime of the server's process tree (all threads of the server process and of
        its live descendants: a peer such as LitServe works in child processes), from /proc."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in [self.process.pid, *self.descendants()]:
            stat = _stat(str(pid))
            if stat is not None:
                total += int(stat[11]) + int(stat[12])
        return total / ticks

    def memory_kib(self, key: str) -> int:
        """VmRSS or VmHWM (the peak RSS) of the server process, in KiB."""
        for line in self._proc("status").splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {key} in /proc/{self.process.pid}/status")

    def reset_peak(self) -> None:
        """VmHWM := VmRSS, so that the next VmHWM is the peak from now on."""
        with open(f"/proc/{self.process.pid}/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")

    def io(self) -> dict[str, int]:
        """/proc/PID/io: rchar, wchar (bytes through read/write syscalls), write_bytes, ..."""
        lines = self._proc("io").splitlines()
        return {key: int(value) for key, value in (line.split(": ") for line in lines)}

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 15 s), then SIGKILL to any descendant its exit left behind."""
        descendants = self.descendants()
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for pid in descendants:
            stat = _stat(str(pid))
            if stat is not None and stat[0] != "Z":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _stat(pid: str) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state, ppid, ...), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_server(script: str, name: str, args: list[str], timeout_s: float) -> Server:
    """Run `script --serve-fd FD *args` as a child serving on a fresh loopback socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    script_path = Path(script).resolve()
    command = [sys.executable, str(script_path), "--serve-fd", str(sock.fileno()), *args]
    env = dict(os.environ, PYTHONPATH=str(script_path.parents[1]))
    process = subprocess.Popen(command, pass_fds=[sock.fileno()], env=env)
    sock.close()  # the child holds its own copy
    server = Server(name, process, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server {name} exited with {process.returncode} during start-up")
        try:
            if httpx.get(server.url + "/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"server {name} did not start within {timeout_s} s")
        time.sleep(0.1)
