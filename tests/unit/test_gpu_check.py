"""Issue 13's GPU check script (benchmarks/gpu_check.sh, gpu_check.py), on this CPU machine.

Without a GPU the command says so and exits 0 with a "no_gpu" results file. `--device cpu
--quick` runs every part for real (tiny-R10x0.25 at 32/48 px, gloo DDP, serve_speed.py over
HTTP) so the code the GPU run depends on is exercised here; the budget guards (a part skipped
for lack of time, a child killed at its budget, the watchdog at the global limit) are run too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PART_NAMES = ["train", "predict", "ddp", "serve"]

pytestmark = pytest.mark.timeout(240)


def run_check(
    out: Path, *args: str, timeout: float = 200
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    command = [sys.executable, str(SCRIPT), "--out", str(out), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    return done, json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_the_command_says_so_exits_0_and_writes_the_file(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
        cwd=tmp_path,  # the script finds the repository itself
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu_check: no GPU: torch.cuda.is_available() is False; nothing measured" in done.stdout
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text(encoding="utf-8"))
    assert result["status"] == "no_gpu"
    assert result["reason"] == "no GPU: torch.cuda.is_available() is False; nothing measured"
    assert result["parts"] == {}
    assert result["environment"]["torch"] == torch.__version__
    assert not (tmp_path / "gpu-results").exists()  # $OUT was used


def test_quick_cpu_mode_runs_every_part(tmp_path: Path) -> None:
    done, result = run_check(tmp_path, "--device", "cpu", "--quick")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert result["status"] == "complete"
    assert result["quick"] is True
    assert result["environment"]["device"] == "cpu"
    parts = result["parts"]
    assert list(parts) == PART_NAMES
    statuses = {name: part["status"] for name, part in parts.items()}
    assert statuses == dict.fromkeys(PART_NAMES, "ok"), json.dumps(parts)[:4000]
    for part in parts.values():
        assert 0 < part["seconds"] <= part["budget_s"]

    train = parts["train"]
    cases = [(r["crop"], r["batch"], r["precision"]) for r in train["rows"]]
    assert cases == [
        (32, 4, "bf16 autocast"),
        (32, 4, "fp32"),
        (48, 2, "bf16 autocast"),
        (48, 2, "fp32"),
    ]
    for row in train["rows"]:
        assert (row["model"], row["status"], row["steps"]) == ("tiny-R10x0.25", "ok", 2)
        assert row["images_per_s"] > 0 and row["step_ms_median"] > 0
    assert sorted(train["bf16_over_fp32"]) == ["32", "48"]
    assert all(ratio > 0 for ratio in train["bf16_over_fp32"].values())

    predict = parts["predict"]
    assert "CPUExecutionProvider" in predict["providers"]
    assert predict["uploads_pinned"] is False  # a CPU run: nothing to upload
    assert predict["runtimes"]["torch"] == {"status": "ok", "reason": None, "autocast": False}
    onnx = predict["runtimes"]["onnxruntime"]
    assert (onnx["status"], onnx["session_providers"]) == ("ok", ["CPUExecutionProvider"])
    assert 0 <= onnx["load_check_max_diff"] <= 1e-3
    keys = [(r["runtime"], r["batch"]) for r in predict["rows"]]
    assert keys == [(rt, b) for rt in ("torch", "onnxruntime") for b in (1, 8, 32)]
    for row in predict["rows"]:
        assert row["calls"] == 3
        assert row["images_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]

    ddp = parts["ddp"]
    assert (ddp["backend"], ddp["precision"], ddp["per_process_batch"], ddp["steps"]) == (
        "gloo",
        "fp32",
        2,
        2,
    )
    assert ddp["one_process_images_per_s"] > 0 and ddp["two_process_images_per_s"] > 0
    ratio = ddp["two_process_images_per_s"] / ddp["one_process_images_per_s"]
    assert ddp["scaling_ratio"] == pytest.approx(ratio, rel=1e-12)

    serve = parts["serve"]
    assert serve["command"].startswith("python benchmarks/serve_speed.py --model tiny-R10x0.25")
    assert [(r["config"], r["concurrency"]) for r in serve["rows"]] == [
        ("off", "1"),
        ("on/d0", "1"),
    ]
    assert all(float(r["images/s"]) > 0 for r in serve["rows"])

    # The printed tables: one section per part.
    for name in PART_NAMES:
        assert f"### {name}: ok" in done.stdout


def test_parts_without_enough_time_left_are_skipped_with_why(tmp_path: Path) -> None:
    done, result = run_check(tmp_path, "--device", "cpu", "--limit", "10", timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert result["status"] == "complete"
    for name, least in zip(PART_NAMES, (30, 20, 40, 45), strict=True):
        part = result["parts"][name]
        assert part["status"] == "skipped"
        assert part["reason"].startswith("only ") and part["reason"].endswith(f"it needs {least}")


def test_a_part_past_its_budget_is_skipped_and_its_servers_killed(tmp_path: Path) -> None:
    # 7 s limit - 5 s reserve: serve_speed.py gets 2 s, too few to start its servers.
    done, result = run_check(
        tmp_path, "--device", "cpu", "--quick", "--parts", "serve", "--limit", "7", timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    serve = result["parts"]["serve"]
    assert serve["status"] == "skipped"
    assert serve["reason"] == "TimeoutError: serve_speed.py did not finish in 2 s"
    assert serve["seconds"] < 10


def test_the_watchdog_writes_partial_results_kills_the_child_and_exits_3(tmp_path: Path) -> None:
    program = textwrap.dedent(
        f"""
        import pathlib, subprocess, sys, threading, time
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import gpu_check
        doc = {{"environment": {{"device": "cpu", "torch": "x"}}, "parts": {{}}, "status": "running"}}
        run = gpu_check.Run(pathlib.Path({str(tmp_path)!r}), 1.0, doc)
        doc["parts"]["train"] = {{"status": "ok", "rows": []}}
        doc["parts"]["predict"] = {{"status": "running"}}
        child = subprocess.Popen(["sleep", "60"], start_new_session=True)
        run.children.procs = [child]
        print(child.pid, flush=True)
        threading.Thread(target=run.watchdog, daemon=True).start()
        time.sleep(60)  # an in-process part that overruns
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 3, done.stderr[-3000:]
    child_pid = int(done.stdout.splitlines()[0])
    assert not Path(f"/proc/{child_pid}").exists()  # killed and reaped
    assert "gpu_check: global limit passed" in done.stdout
    result = json.loads((tmp_path / "gpu_check.json").read_text(encoding="utf-8"))
    assert result["status"] == "timed_out"
    assert result["parts"]["train"]["status"] == "ok"
    assert result["parts"]["predict"] == {
        "status": "skipped",
        "reason": "the global time limit passed during it",
    }
