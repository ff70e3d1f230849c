"""Processes seen through /proc (Linux): parents, children, liveness (a zombie is dead)."""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid_dir: Path) -> list[str] | None:
    """The fields after "pid (comm)" of /proc/<pid>/stat; comm may hold spaces and ")"."""
    try:
        return (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def live_parents() -> dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry)
            if fields is not None and fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    return parents


def children(pid: int) -> list[int]:
    """Live direct children of `pid`."""
    return sorted(child for child, parent in live_parents().items() if parent == pid)


def descendants(pid: int) -> set[int]:
    """All live descendants of `pid`."""
    parents = live_parents()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        below = {child for child, parent in parents.items() if parent in frontier}
        frontier = below - found
        found |= below
    return found


def alive(pid: int) -> bool:
    fields = _stat_fields(Path(f"/proc/{pid}"))
    return fields is not None and fields[0] != "Z"


REPO_ROOT = Path(__file__).resolve().parents[1]


def embedded_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    """This environment for an embedded `bitserve up` under `home` on `port`: every BITSERVE_*
    and server URL removed (SQLite, the SQLAlchemy broker, the store under home), CPU, this
    checkout importable, plus `extra` BITSERVE_* settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BITSERVE_")
        and k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")
    }
    env.update(
        BITSERVE_HOME=str(home),
        BITSERVE_PORT=str(port),
        BITSERVE_DEVICE="cpu",
        OMP_NUM_THREADS="2",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env
