"""bitcore.cpus: CPUs from the affinity mask, the cgroup quota (v2 and v1, fabricated trees
under tmp_path) and BITSERVE_CPUS; torch's thread setting for serving processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bitcore.cpus import (
    CpuBudget,
    affinity_cpus,
    available_cpus,
    cgroup_cpu_quota,
    cpu_budget,
    parse_cpus_env,
    set_torch_threads,
)
from bitcore.data.index import available_cpus as index_available_cpus

V2_SELF = "0::/kubepods/pod1/ctr\n"
V1_SELF = "12:pids:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("latin-1"))  # latin-1: odd bytes (\xff) go through as is
    return path


def v2_tree(
    tmp_path: Path, levels: dict[str, str], self_cgroup: str = V2_SELF
) -> tuple[Path, Path]:
    """A cgroup v2 mount with `cpu.max` files at the given relative directories."""
    root = tmp_path / "cgroup"
    root.mkdir()
    write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    for directory, text in levels.items():
        write(root / directory / "cpu.max", text)
    return root, write(tmp_path / "self_cgroup", self_cgroup)


def v1_tree(
    tmp_path: Path, levels: dict[str, tuple[str, str]], mount: str = "cpu,cpuacct"
) -> tuple[Path, Path]:
    """A cgroup v1 cpu controller mount with cfs quota/period files per directory."""
    root = tmp_path / "cgroup"
    for directory, (quota, period) in levels.items():
        write(root / mount / directory / "cpu.cfs_quota_us", quota)
        write(root / mount / directory / "cpu.cfs_period_us", period)
    (root / mount).mkdir(parents=True, exist_ok=True)
    return root, write(tmp_path / "self_cgroup", V1_SELF)


@pytest.mark.parametrize(
    ("text", "quota"),
    [
        ("max 100000\n", None),
        ("200000 100000\n", 2.0),
        ("150000 100000\n", 1.5),
        ("50000 100000\n", 0.5),
        ("400000 200000\n", 2.0),
        ("300000\n", 3.0),  # no period: the kernel's default, 100 ms
        ("", None),
        ("banana split\n", None),
        ("-1 100000\n", None),
        ("200000 0\n", None),
        ("0 100000\n", None),
    ],
)
def test_v2_cpu_max_of_the_process_cgroup(tmp_path: Path, text: str, quota: float | None) -> None:
    root, self_cgroup = v2_tree(tmp_path, {"kubepods/pod1/ctr": text})
    assert cgroup_cpu_quota(root, self_cgroup) == quota


def test_v2_a_parent_limit_applies_and_the_tightest_wins(tmp_path: Path) -> None:
    root, self_cgroup = v2_tree(
        tmp_path,
        {"": "max 100000", "kubepods": "800000 100000", "kubepods/pod1": "250000 100000"},
    )
    # The container's own directory has no cpu.max (its controller is not enabled there).
    (root / "kubepods/pod1/ctr").mkdir()
    assert cgroup_cpu_quota(root, self_cgroup) == 2.5
    write(root / "kubepods/pod1/ctr/cpu.max", "max 100000")
    assert cgroup_cpu_quota(root, self_cgroup) == 2.5  # unlimited below a limited parent


def test_v2_host_path_absent_in_the_container_falls_back_to_the_mount(tmp_path: Path) -> None:
    # No cgroup namespace: /proc/self/cgroup names the host's path, the mount is our cgroup.
    root, self_cgroup = v2_tree(tmp_path, {"": "100000 100000"}, "0::/system.slice/docker-1\n")
    assert cgroup_cpu_quota(root, self_cgroup) == 1.0


def test_v2_unlimited_everywhere_is_no_quota(tmp_path: Path) -> None:
    root, self_cgroup = v2_tree(tmp_path, {"": "max 100000", "kubepods/pod1/ctr": "max 100000"})
    assert cgroup_cpu_quota(root, self_cgroup) is None


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [
        ("-1", "100000", None),
        ("200000", "100000", 2.0),
        ("150000", "100000", 1.5),
        ("25000", "50000", 0.5),
        ("garbage", "100000", None),
        ("200000", "", None),
        ("200000", "-5", None),
    ],
)
def test_v1_cfs_quota_over_period(
    tmp_path: Path, quota: str, period: str, expected: float | None
) -> None:
    root, self_cgroup = v1_tree(tmp_path, {"docker/abc": (quota, period)})
    assert cgroup_cpu_quota(root, self_cgroup) == expected


def test_v1_mount_named_cpu_and_parent_limits(tmp_path: Path) -> None:
    root, self_cgroup = v1_tree(
        tmp_path,
        {"": ("-1", "100000"), "docker": ("300000", "100000"), "docker/abc": ("-1", "100000")},
        mount="cpu",
    )
    assert cgroup_cpu_quota(root, self_cgroup) == 3.0


def test_hybrid_v1_cpu_and_v2_unified_take_the_tightest(tmp_path: Path) -> None:
    root, _ = v1_tree(tmp_path, {"docker/abc": ("400000", "100000")})
    write(root / "cpu.max", "150000 100000")
    self_cgroup = write(tmp_path / "both", "4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cgroup_cpu_quota(root, self_cgroup) == 1.5


@pytest.mark.parametrize(
    "self_text",
    ["", "not a cgroup file\n", "0::relative/path\n", "0::/../../etc\n", "\x00\xff::\n"],
)
def test_odd_proc_self_cgroup_reads_the_mount_itself(tmp_path: Path, self_text: str) -> None:
    root, self_cgroup = v2_tree(tmp_path, {"": "200000 100000"}, self_text)
    assert cgroup_cpu_quota(root, self_cgroup) == 2.0


def test_missing_files_mean_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path / "none", tmp_path / "no_self") is None
    (tmp_path / "dir_not_file" / "cpu.max").mkdir(parents=True)
    assert cgroup_cpu_quota(tmp_path / "dir_not_file", tmp_path / "no_self") is None


@pytest.mark.parametrize(
    ("affinity", "quota", "override", "cpus"),
    [
        (64, None, None, 64),
        (64, 2.0, None, 2),
        (64, 1.5, None, 2),  # a fractional quota rounds up
        (64, 2.0000000001, None, 2),  # float noise of quota/period is not a third CPU
        (64, 0.2, None, 1),  # never below 1
        (4, 16.0, None, 4),  # the affinity mask is tighter
        (64, 2.0, 6, 6),  # BITSERVE_CPUS replaces both
        (2, None, 8, 8),
    ],
)
def test_budget_is_min_of_affinity_and_rounded_up_quota(
    affinity: int, quota: float | None, override: int | None, cpus: int
) -> None:
    assert CpuBudget(affinity, quota, override).cpus == cpus


def test_describe_names_every_figure() -> None:
    assert CpuBudget(64, None, None).describe() == "affinity 64, quota none"
    assert CpuBudget(64, 1.5, None).describe() == "affinity 64, quota 1.5"
    assert CpuBudget(8, 2.0, 4).describe() == "affinity 8, quota 2, BITSERVE_CPUS 4"


def test_cpu_budget_from_a_fabricated_tree(tmp_path: Path) -> None:
    root, self_cgroup = v2_tree(tmp_path, {"kubepods/pod1/ctr": "150000 100000"})
    affinity = len(os.sched_getaffinity(0))
    budget = cpu_budget(environ={}, cgroup_root=root, proc_cgroup=self_cgroup)
    assert budget == CpuBudget(affinity, 1.5, None)
    assert available_cpus(environ={}, cgroup_root=root, proc_cgroup=self_cgroup) == min(affinity, 2)
    env = {"BITSERVE_CPUS": "3"}
    assert available_cpus(environ=env, cgroup_root=root, proc_cgroup=self_cgroup) == 3
    # The gateway's validated setting wins over the environment.
    budget = cpu_budget(override=5, environ=env, cgroup_root=root, proc_cgroup=self_cgroup)
    assert budget.cpus == 5


def test_affinity_is_the_process_mask() -> None:
    assert affinity_cpus() == len(os.sched_getaffinity(0))


def test_the_old_import_still_works() -> None:
    assert index_available_cpus is available_cpus


@pytest.mark.parametrize(("value", "cpus"), [(None, None), ("", None), ("  ", None), (" 4 ", 4)])
def test_cpus_env_values(value: str | None, cpus: int | None) -> None:
    assert parse_cpus_env(value) == cpus


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "two", "4 cores"])
def test_a_bad_cpus_env_is_a_clear_error(value: str) -> None:
    with pytest.raises(ValueError, match=r"BITSERVE_CPUS must be a whole number of CPUs >= 1"):
        parse_cpus_env(value)
    with pytest.raises(ValueError, match="BITSERVE_CPUS"):
        available_cpus(environ={"BITSERVE_CPUS": value})


def test_set_torch_threads_sets_intra_op_and_keeps_inter_op_at_one() -> None:
    before = torch.get_num_threads()
    try:
        assert set_torch_threads(2) == 2
        assert torch.get_num_threads() == 2
        assert set_torch_threads(1) == 1  # again: the inter-op figure can be set only once
        # Either this call set it to 1, or something before it in this process fixed it.
        assert torch.get_num_interop_threads() >= 1
        with pytest.raises(ValueError, match="threads must be >= 1"):
            set_torch_threads(0)
    finally:
        torch.set_num_threads(before)
