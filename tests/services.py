"""Find (or start) the Redis and PostgreSQL servers the integration tests need.

Each is looked for at the URL in the environment (TEST_REDIS_URL / REDIS_URL, TEST_DATABASE_URL)
or, when that is unset, at the local default port; if nothing answers there, a private server is
started from the installed binaries (redis-server; initdb + pg_ctl).
If none of that works the test session fails, saying how to get them: it never skips.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

HOW_TO = (
    "Integration tests need Redis and PostgreSQL. Start them with "
    "`docker compose up -d redis postgres` (after making its secrets/, then export "
    "REDIS_URL=redis://:$(cat secrets/redis_password)@127.0.0.1:6379/0 TEST_DATABASE_URL="
    "postgresql://bitserve:$(cat secrets/postgres_password)@127.0.0.1:5432/bitserve), or install "
    "redis-server and PostgreSQL (initdb, pg_ctl) so the tests can start private ones."
)


class ServiceUnavailable(RuntimeError):
    pass


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with socket.socket() as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except Exception:
        return False


def _postgres_answers(url: str) -> bool:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
        return True
    except Exception:
        return False


class PrivateServers:
    """Servers this test session started itself; stopped at the end."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bitserve-test-services-"))
        self.stops: list[list[str]] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def start_redis(self) -> str:
        binary = shutil.which("redis-server")
        if not binary:
            raise ServiceUnavailable(
                "no Redis answers and redis-server is not installed. " + HOW_TO
            )
        port = _free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.procs.append(proc)
        url = f"redis://127.0.0.1:{port}/0"
        _wait(lambda: _redis_answers(url), "private redis-server")
        return url

    def start_postgres(self) -> str:
        initdb = shutil.which("initdb") or _pg_bin("initdb")
        pg_ctl = shutil.which("pg_ctl") or _pg_bin("pg_ctl")
        if not (initdb and pg_ctl):
            raise ServiceUnavailable(
                "no PostgreSQL answers and initdb/pg_ctl are not installed. " + HOW_TO
            )
        data = self.tmp / "pgdata"
        port = _free_port()
        prefix: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            runuser = shutil.which("runuser")
            if not runuser:
                raise ServiceUnavailable(
                    "running as root without runuser to start PostgreSQL. " + HOW_TO
                )
            prefix = [runuser, "-u", "postgres", "--"]
            shutil.chown(self.tmp, "postgres")
        self._run("initdb", [*prefix, initdb, "-D", str(data), "-U", "postgres", "-A", "trust"])
        self._run(
            "pg_ctl start",
            [
                *prefix,
                pg_ctl,
                "-D",
                str(data),
                "-o",
                f"-p {port} -k {self.tmp} -h 127.0.0.1",
                "-l",
                str(self.tmp / "pg.log"),
                "-w",
                "start",
            ],
        )
        self.stops.append([*prefix, pg_ctl, "-D", str(data), "-m", "fast", "stop"])
        return f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _run(self, what: str, command: list[str]) -> None:
        """Run a server command; on failure say why (its output and the server log's tail)."""
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            log = self.tmp / "pg.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ServiceUnavailable(
                f"{what} failed (exit {result.returncode}): {result.stderr.strip()} "
                f"{result.stdout.strip()} {tail}".strip()
                + ". "
                + HOW_TO
            )

    def close(self) -> None:
        for cmd in self.stops:
            subprocess.run(cmd, capture_output=True)
        for proc in self.procs:
            proc.terminate()
            with suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _pg_bin(name: str) -> str | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


def _wait(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise ServiceUnavailable(f"{what} did not answer within {timeout:.0f} s. " + HOW_TO)


def find_redis(private: PrivateServers) -> str:
    url = (
        os.environ.get("TEST_REDIS_URL")
        or os.environ.get("REDIS_URL")
        or "redis://127.0.0.1:6379/0"
    )
    if _redis_answers(url):
        return url
    return private.start_redis()


def find_postgres(private: PrivateServers) -> str:
    url = os.environ.get("TEST_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
    if not _postgres_answers(url):
        url = private.start_postgres()
    return url


def create_database(admin_url: str) -> tuple[str, str]:
    """A fresh, uniquely named database for this test session: (url, name)."""
    import sqlalchemy as sa

    name = f"bitserve_test_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path=f"/{name}")), name


def drop_database(admin_url: str, name: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()
