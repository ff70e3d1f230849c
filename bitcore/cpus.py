"""How many CPUs this process really has: its affinity mask, its cgroup CPU quota, an override.

`os.cpu_count()` is the host's count: a container limited to 2 CPUs (`docker run --cpus 2`,
a Kubernetes `limits.cpu: 2`) on a 64-core host sees 64, and 64 busy threads on a 2-CPU quota
are throttled by the kernel every scheduling period (100 ms by default) instead of running.
So the figure every thread pool is sized from is

    min(len(os.sched_getaffinity(0)), ceil(cgroup CPU quota))

- affinity: the CPUs the scheduler may run this process on (`taskset`, a cpuset, `--cpuset-cpus`);
- quota: cgroup v2 `cpu.max` ("max 100000" = no limit, "200000 100000" = 2 CPUs) or cgroup v1
  `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1 = no limit) of this process's cgroup (found
  through /proc/self/cgroup) and of every ancestor up to the mount: a limit on a parent limits
  the children too, so the smallest wins. A fractional quota (1.5 CPUs) rounds up: the half CPU
  is still time a thread can use. A missing or unreadable file means "no limit", never an error.
- `BITSERVE_CPUS` (a positive whole number), when set, replaces both: for operators who know
  better (e.g. a gateway sharing its quota with a sidecar).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

CPUS_ENV = "BITSERVE_CPUS"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 mounts the cpu controller under one of these names (distributions differ).
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


@dataclass(frozen=True)
class CpuBudget:
    """The figures behind `cpus`, for the start-up log line and the metrics."""

    affinity: int  # CPUs in the affinity mask
    quota: float | None  # the cgroup CPU quota in CPUs (None: no limit)
    override: int | None  # BITSERVE_CPUS, when set

    @property
    def cpus(self) -> int:
        """The CPUs to size thread pools for: at least 1."""
        if self.override is not None:
            return self.override
        cpus = self.affinity
        if self.quota is not None:
            cpus = min(cpus, _ceil(self.quota))
        return max(1, cpus)

    def describe(self) -> str:
        """E.g. "affinity 64, quota 2" or "affinity 8, quota none, BITSERVE_CPUS 4"."""
        quota = "none" if self.quota is None else f"{self.quota:g}"
        text = f"affinity {self.affinity}, quota {quota}"
        if self.override is not None:
            text += f", {CPUS_ENV} {self.override}"
        return text


def cpu_budget(
    *,
    override: int | None = None,
    environ: Mapping[str, str] | None = None,
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = PROC_SELF_CGROUP,
) -> CpuBudget:
    """This process's CPU figures. `override` (e.g. the gateway's validated setting) wins over
    $BITSERVE_CPUS; the paths are parameters so tests can use fabricated cgroup trees."""
    if override is not None and override < 1:
        raise ValueError(f"the CPU override must be >= 1, got {override}")
    if override is None:
        override = parse_cpus_env((os.environ if environ is None else environ).get(CPUS_ENV))
    return CpuBudget(affinity_cpus(), cgroup_cpu_quota(cgroup_root, proc_cgroup), override)


def available_cpus(
    *,
    environ: Mapping[str, str] | None = None,
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = PROC_SELF_CGROUP,
) -> int:
    """The CPUs this process may really use (module docstring): at least 1."""
    return cpu_budget(environ=environ, cgroup_root=cgroup_root, proc_cgroup=proc_cgroup).cpus


def set_torch_threads(threads: int) -> int:
    """Size torch's CPU thread pools for a serving process: `threads` intra-op threads (one
    forward spread over the cores) and 1 inter-op thread (nothing forks graph branches here).

    Process-wide: torch applies the intra-op figure to every thread that runs parallel work
    afterwards. The inter-op figure can be set only once per process, and not after inter-op
    work started; a process that already set it keeps its own. Returns torch's intra-op count.
    """
    import torch  # only the processes that run forwards need it

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != 1:
        # Raises when already set, or once inter-op work has run: then it stays as it is.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
    return torch.get_num_threads()


def parse_cpus_env(value: str | None) -> int | None:
    """$BITSERVE_CPUS as a positive int (None when unset or blank); anything else is an error:
    a typo must not silently size every pool from the host's core count."""
    if value is None or not value.strip():
        return None
    try:
        cpus = int(value.strip())
    except ValueError:
        cpus = 0
    if cpus < 1:
        raise ValueError(f"{CPUS_ENV} must be a whole number of CPUs >= 1, got {value!r}")
    return cpus


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (a container's cpuset, `taskset`)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux (macOS has no affinity masks)
        return os.cpu_count() or 1


def cgroup_cpu_quota(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroups, v2 and v1; None: no limit."""
    quotas = [
        q for q in (_v2_quota(cgroup_root, proc_cgroup), _v1_quota(cgroup_root, proc_cgroup)) if q
    ]
    return min(quotas) if quotas else None


def _v2_quota(root: Path, proc_cgroup: Path) -> float | None:
    path = _cgroup_path(proc_cgroup, v2=True)
    return _tightest(_read_cpu_max(d / "cpu.max") for d in _levels(root, path))


def _v1_quota(root: Path, proc_cgroup: Path) -> float | None:
    path = _cgroup_path(proc_cgroup, v2=False)
    for name in _V1_CPU_DIRS:
        mount = root / name
        if mount.is_dir():
            return _tightest(_read_cfs(d) for d in _levels(mount, path))
    return None


def _tightest(quotas: Iterator[float | None]) -> float | None:
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _cgroup_path(proc_cgroup: Path, *, v2: bool) -> PurePosixPath:
    """This process's cgroup path: the "0::<path>" line (v2) or the line whose controller list
    holds "cpu" (v1); "/" when there is none or the file is unreadable."""
    try:
        lines = proc_cgroup.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return PurePosixPath("/")
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if (v2 and parts[0] == "0" and controllers == "") or (
            not v2 and "cpu" in controllers.split(",")
        ):
            return PurePosixPath(path if path.startswith("/") else "/")
    return PurePosixPath("/")


def _levels(mount: Path, path: PurePosixPath) -> Iterator[Path]:
    """The cgroup's directory under `mount` and each parent up to the mount itself. Without a
    cgroup namespace the path is the host's and absent in the container: only the mount's own
    files (the container's cgroup) are found then, which is the fallback wanted."""
    parts = [p for p in path.parts[1:] if p not in ("", ".", "..")]
    for depth in range(len(parts), -1, -1):
        yield mount.joinpath(*parts[:depth])


def _read_cpu_max(path: Path) -> float | None:
    """cgroup v2 cpu.max: "<quota|max> <period>"; None for no limit or anything unreadable."""
    fields = _read(path).split()
    if not fields or fields[0] == "max":
        return None
    period = fields[1] if len(fields) > 1 else "100000"  # the kernel's default period
    return _ratio(fields[0], period)


def _read_cfs(directory: Path) -> float | None:
    """cgroup v1 cpu.cfs_quota_us / cpu.cfs_period_us; -1 (or anything odd) is no limit."""
    return _ratio(_read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us"))


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota.strip()), int(period.strip())
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace")[:256]
    except OSError:  # missing, a directory, permission denied: no limit known here
        return ""


def _ceil(cpus: float) -> int:
    # Rounded first so float noise in quota/period (e.g. 2.0000000001) cannot make 2 CPUs 3.
    return math.ceil(round(cpus, 6))


__all__ = [
    "CPUS_ENV",
    "CpuBudget",
    "affinity_cpus",
    "available_cpus",
    "cgroup_cpu_quota",
    "cpu_budget",
    "parse_cpus_env",
    "set_torch_threads",
]
