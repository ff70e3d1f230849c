"""`python -m bitcore finetune` progress where it goes: short lines when redirected, JSON lines
with --json, nothing with --quiet (real CLI, tiny model, generated images)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitcore.cli_progress import format_eta, format_step
from bitcore.train import Progress
from tests.imagegen import make_image_folder

REPO = Path(__file__).resolve().parents[2]
RULE = ["--set", "batch_size=2", "--set", "precrop=36", "--set", "crop=32", "--set", "base_lr=0.01"]


def finetune(dataset: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "bitcore", "finetune", str(dataset), "--out", str(out)]
    argv += ["--base-model", "tiny-R10x0.25", "--from-scratch", "--device", "cpu", *RULE]
    return subprocess.run(
        [*argv, *extra],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,  # not a terminal: the line log, not the bar
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ds"), {"red": 4, "teal": 4}, size=(32, 32))


def test_step_line_format() -> None:
    progress = Progress(250, 3000, 0.0021, 0.0013, 348.2, 361.0, "training")
    assert format_step(progress) == "step 250/3000 loss 0.0021 lr 0.0013 348 img/s eta 6m"
    assert [format_eta(s) for s in (None, 4.4, 59.6, 3599, 7260)] == [
        "?",
        "4s",
        "1m",
        "60m",
        "2h01m",
    ]


def test_redirected_300_step_run_writes_short_lines(dataset: Path, tmp_path: Path) -> None:
    # --log-every 0: a line at every step, the most a redirected log can get.
    done = finetune(dataset, tmp_path / "m", "--set", "steps=300", "--log-every", "0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr
    lines = done.stderr.splitlines()
    assert max(len(line) for line in lines) <= 200, [x for x in lines if len(x) > 200]
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 300
    assert steps[0].startswith("step 1/300 loss 0.6931 lr 0 ")
    assert steps[-1].startswith("step 300/300 loss ") and steps[-1].endswith(" eta 0s")
    assert done.stdout.startswith(f"artifact written to {tmp_path / 'm'} (300 steps, ")
    # The work folder (caches, checkpoints, curves.pending.json) goes after success.
    assert not (tmp_path / "m.work").exists()
    assert json.loads((tmp_path / "m" / "curves.json").read_text())["training"][-1]["step"] == 300


def test_json_lines_then_the_result(dataset: Path, tmp_path: Path) -> None:
    done = finetune(
        dataset, tmp_path / "m", "--set", "steps=6", "--json", "--log-every", "0", "--keep-cache"
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[0]["event"] == "plan" and events[0]["plan"]["total_steps"] == 6
    training = [e["step"] for e in events if e["event"] == "progress" and e["phase"] == "training"]
    assert training == [1, 2, 3, 4, 5, 6]
    result = events[-1]
    assert result["event"] == "result" and result["artifact"] == str(tmp_path / "m")
    assert (result["steps"], result["resumed_from"]) == (6, None)
    assert (
        result["accuracy"]
        == json.loads((tmp_path / "m" / "metadata.json").read_text())["metrics"]["accuracy"]
    )
    assert done.stderr == ""
    # --keep-cache keeps the decoded caches, not the finished run's pending curves.
    assert (tmp_path / "m.work" / "cache").is_dir()
    assert not (tmp_path / "m.work" / "curves.pending.json").exists()


def test_quiet_prints_only_the_result(dataset: Path, tmp_path: Path) -> None:
    done = finetune(dataset, tmp_path / "m", "--set", "steps=3", "--quiet")
    assert done.returncode == 0 and done.stderr == ""
    assert len(done.stdout.splitlines()) == 1
    assert done.stdout.startswith(f"artifact written to {tmp_path / 'm'} (3 steps, ")
    again = finetune(dataset, tmp_path / "m", "--set", "steps=3", "--quiet", "--overwrite")
    assert again.returncode == 0, again.stderr
    image = str(dataset / "red" / "red_000.png")
    predicted = subprocess.run(
        [sys.executable, "-m", "bitcore", "predict", str(tmp_path / "m"), image, "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    document = json.loads(predicted.stdout)
    assert document["predictions"][0]["image"] == image
    assert [t["label"] for t in document["predictions"][0]["top"]] in (
        ["red", "teal"],
        ["teal", "red"],
    )
