"""Ctrl-C (SIGINT) during `python -m bitcore finetune` saves a checkpoint and exits 130; the
same command resumes ("resuming from step N") and ends with the weights of an uninterrupted
run; a changed --set names --restart; --restart starts over (real CLI, tiny model)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitcore import artifacts
from bitcore.hyperrule import plan as hyperrule_plan
from bitcore.train import Progress, TrainCallbacks, TrainingCancelled, finetune
from tests.imagegen import make_image_folder

REPO = Path(__file__).resolve().parents[2]
STEPS = 40
RULE = ["--set", "batch_size=2", "--set", "precrop=36", "--set", "crop=32", "--set", "base_lr=0.01"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def argv(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "bitcore", "finetune", str(dataset), "--out", str(out),
        "--base-model", "tiny-R10x0.25", "--from-scratch", "--device", "cpu", "--seed", "1",
        "--log-every", "0", *RULE, "--set", f"steps={STEPS}", *extra,
    ]  # fmt: skip


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ds"), {"red": 4, "teal": 4}, size=(32, 32))


def interrupt_at(command: list[str], step: int, log: Path) -> tuple[int, str]:
    """Start the CLI, send SIGINT once it has logged `step`, return (exit status, stderr)."""
    with log.open("w") as err:
        proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=err)
        deadline = time.monotonic() + 300
        while f"\nstep {step}/" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=300)
    return code, log.read_text()


def test_ctrl_c_checkpoints_and_the_rerun_resumes_to_the_same_weights(
    dataset: Path, tmp_path: Path
) -> None:
    straight = run(argv(dataset, tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr[-2000:]

    out = tmp_path / "b"
    code, err = interrupt_at(argv(dataset, out), 5, tmp_path / "log")
    assert code == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    stopped = re.fullmatch(
        rf"interrupted at step (\d+)/{STEPS}; checkpoint saved in {out}.work\. Run the same "
        r"command again to continue from there, or add --restart to start over\.",
        last,
    )
    assert stopped, last
    step = int(stopped.group(1))
    assert 5 <= step < STEPS  # before the periodic checkpoint (every 50 steps): Ctrl-C's own
    assert sorted(p.name for p in (out.with_name("b.work") / "state").iterdir()) == [
        f"step-{step:08d}"
    ]
    assert not out.exists()

    # A different rule cannot resume that checkpoint: the message names the real flag.
    changed = run([*argv(dataset, out), "--set", "base_lr=0.02"])
    assert changed.returncode == 2
    error = changed.stderr.strip().splitlines()[-1]
    assert error.startswith("error: checkpoint ") and "differs in ['plan']" in error
    assert error.endswith("add --restart to discard it and start over")
    assert "resume=False" not in changed.stderr

    resumed = run(argv(dataset, out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from step {step} (the checkpoint in {out}.work; --restart starts over)" in (
        resumed.stderr
    )
    assert resumed.stdout.startswith(f"artifact written to {out} ({STEPS} steps, ")
    assert f", resumed from step {step})" in resumed.stdout
    lines = [ln for ln in resumed.stderr.splitlines() if ln.startswith("step ")]
    assert lines[0].startswith(f"step {step + 1}/{STEPS} ")
    a = artifacts.load_weights(tmp_path / "a")
    b = artifacts.load_weights(out)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert not out.with_name("b.work").exists()

    # --restart: the saved state is discarded, training starts at step 1.
    code, err = interrupt_at(argv(dataset, tmp_path / "c"), 3, tmp_path / "log2")
    assert code == 130
    again = run(argv(dataset, tmp_path / "c", "--restart"))
    assert again.returncode == 0 and "resuming" not in again.stderr
    assert next(ln for ln in again.stderr.splitlines() if ln.startswith("step ")).startswith(
        f"step 1/{STEPS} "
    )
    assert "resumed from" not in again.stdout


class _Timed(TrainCallbacks):
    """Cancels after `stop_after` steps; records when the first step of the run began (the
    first should_cancel poll, after the loop set its rate window) and its reported speed."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after
        self.first_poll: float | None = None
        self.first: tuple[float, Progress] | None = None
        self.steps = 0

    def should_cancel(self) -> bool:
        if self.first_poll is None:
            self.first_poll = time.perf_counter()
        return self.stop_after is not None and self.steps >= self.stop_after

    def on_progress(self, progress: Progress) -> None:
        if progress.phase == "training":
            self.steps += 1
            if self.first is None:
                self.first = (time.perf_counter(), progress)


def test_speed_restarts_after_a_resume(dataset: Path, tmp_path: Path) -> None:
    """The first step after resuming from step 20 reports one step's images over that step's
    time, not 21 steps' worth (the 25,688 img/s of issue 17)."""
    plan = hyperrule_plan(8, (32, 32), steps=40, batch_size=2, precrop=36, crop=32)
    common = dict(from_scratch=True, seed=1, num_workers=0, device="cpu")
    with pytest.raises(TrainingCancelled):
        finetune(dataset, "tiny-R10x0.25", plan, tmp_path / "m", callbacks=_Timed(20), **common)  # type: ignore[arg-type]
    timed = _Timed()
    result = finetune(dataset, "tiny-R10x0.25", plan, tmp_path / "m", callbacks=timed, **common)  # type: ignore[arg-type]
    assert result.resumed_from == 20
    assert timed.first is not None and timed.first_poll is not None
    reported_at, first = timed.first
    assert first.step == 21
    # The loop's window starts before the first poll, and the step ends before the report.
    assert first.images_per_second is not None
    assert 0 < first.images_per_second <= 2 * 2 / (reported_at - timed.first_poll)
