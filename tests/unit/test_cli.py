"""`python -m bitcore`: the plan command and the user-error paths (one line, exit status 2)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bitcore.cli import main
from tests.imagegen import make_image_folder

REPO = Path(__file__).resolve().parents[2]
BOTH_WEIGHT_SOURCES = ["--base-model", "m", "--out", "o", "--from-scratch", "--checkpoint", "c"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_prints_summary_plan_and_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_image_folder(
        tmp_path, {"cat": 6, "dog": 5}, size=(40, 48), corrupt={"dog/x.png": "truncated"}
    )
    code, out, err = _run(["plan", str(tmp_path), "--set", "steps=50"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:9] == [
        f"dataset     {tmp_path}",
        "images      11 valid (9 train, 2 validation), 1 rejected",
        "image size  median 40x48 (height x width)",
        "classes     2",
        "  cat                      6",
        "  dog                      5",
        "rejected",
        "  dog/x.png: undecodable (cannot decode PNG image: image file is truncated)",
        "",
    ]
    assert lines[9:] == [
        "BiT-HyperRule plan",
        "  resolution     resize 160, crop 128 (code numbers)",
        "  steps          50 (warmup 10, decay at [20, 30, 40])",
        "  batch size     512 (micro-batch auto)",
        "  learning rate  0.003, SGD momentum 0.9, weight decay 0",
        "  mixup alpha    0",
        "  head           zero-initialised",
        "  overridden     steps",
    ]


def test_plan_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_image_folder(tmp_path, {"a": 3, "b": 4}, size=(20, 30), corrupt={"a/n.gif": "empty"})
    code, out, _ = _run(["plan", str(tmp_path), "--json", "--set", "steps=100"], capsys)
    assert code == 0
    document = json.loads(out)
    assert document["dataset"] == {
        "root": str(tmp_path),
        "num_images": 7,
        "num_train": 5,
        "classes": [{"name": "a", "count": 3}, {"name": "b", "count": 4}],
        "image_size": {"median_height": 20, "median_width": 30},
        "rejected": [{"path": "a/n.gif", "reason": "empty"}],
    }
    plan = document["plan"]
    assert (plan["precrop"], plan["crop"], plan["total_steps"]) == (160, 128, 100)
    assert (plan["warmup_steps"], plan["decay_steps"]) == (20, [40, 60, 80])
    assert plan["source"]["num_examples"] == 5 and plan["source"]["overridden"] == ["steps"]


def test_plan_large_images_paper_resolution_and_float_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_image_folder(tmp_path, {"a": 2, "b": 2}, size=(96, 100))  # 96*100 >= 96*96
    argv = ["plan", str(tmp_path), "--resolution", "paper", "--set", "base_lr=0.001"]
    argv += ["--set", "batch_size=64", "--validation-fraction", "0"]
    code, out, _ = _run(argv, capsys)
    assert code == 0
    assert "images      4 valid (4 train, 0 validation), 0 rejected" in out
    assert "  resolution     resize 448, crop 384 (paper numbers)" in out
    assert "  steps          500 (warmup 100, decay at [200, 300, 400])" in out
    assert "  learning rate  0.001, SGD momentum 0.9, weight decay 0" in out
    assert "  batch size     64 (micro-batch auto)" in out
    assert "  overridden     base_lr, batch_size" in out


@pytest.mark.parametrize(
    ("argv_tail", "message"),
    [
        (["--set", "foo=1"], "error: unknown override(s) ['foo']"),
        (["--set", "crop=200"], "error: crop (200) must be <= precrop (160)"),
        (["--set", "steps=0"], "error: steps must be >= 1, got 0"),
        (["--validation-fraction", "1"], "error: --validation-fraction must be in [0, 1), got 1.0"),
    ],
)
def test_plan_bad_values_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv_tail: list[str], message: str
) -> None:
    make_image_folder(tmp_path)
    code, out, err = _run(["plan", str(tmp_path), *argv_tail], capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith(message)


def test_dataset_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["plan", str(tmp_path / "missing")], capsys)
    assert (code, err) == (2, f"error: {tmp_path / 'missing'} is not a directory\n")

    make_image_folder(tmp_path / "ds", {"a": 4, "b": 1, "c": 0})
    code, _, err = _run(["plan", str(tmp_path / "ds")], capsys)
    assert code == 2
    assert err == ("error: each class needs at least 2 valid images; too few in: b (1), c (0)\n")


def test_argument_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, expected in [
        ([], "the following arguments are required: COMMAND"),
        (["plan", str(tmp_path), "--set", "steps"], "expected KEY=VALUE, got 'steps'"),
        (["plan", str(tmp_path), "--set", "steps=ten"], "value of steps must be a number"),
        (["plan", str(tmp_path), "--resolution", "huge"], "invalid choice: 'huge'"),
        (["finetune", str(tmp_path), "--out", "x"], "required: --base-model"),
        (["predict", str(tmp_path), "a.png", "--top-k", "0"], "must be >= 1, got 0"),
        (["checkpoints"], "required: ACTION"),
        (
            ["finetune", str(tmp_path), *BOTH_WEIGHT_SOURCES],
            "argument --checkpoint: not allowed with argument --from-scratch",
        ),
    ]:
        code, out, err = _run(argv, capsys)
        assert code == 2 and out == "", argv
        assert expected in err, (argv, err)


def test_finetune_and_predict_input_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_image_folder(tmp_path / "ds")
    code, _, err = _run(
        ["finetune", str(tmp_path / "ds"), "--base-model", "BiT-Z-R1", "--out", "o"], capsys
    )
    assert code == 2 and err.startswith("error: unknown base model 'BiT-Z-R1'; ")
    code, _, err = _run(
        [
            "finetune",
            str(tmp_path / "ds"),
            "--base-model",
            "tiny-R10x0.25",
            "--out",
            "o",
            "--checkpoint",
            str(tmp_path / "none.npz"),
        ],
        capsys,
    )
    assert (code, err) == (
        2,
        (
            f"error: checkpoint file {tmp_path / 'none.npz'} does not exist; expected an official "
            "BiT .npz file\n"
        ),
    )
    code, _, err = _run(["predict", str(tmp_path / "nope"), "a.png"], capsys)
    assert (code, err) == (2, f"error: artifact directory {tmp_path / 'nope'} does not exist\n")
    (tmp_path / "metadata.json").write_text("{}")  # looks like an artifact to the cheap check
    code, _, err = _run(["predict", str(tmp_path), str(tmp_path / "a.png")], capsys)
    assert (code, err) == (2, f"error: image {tmp_path / 'a.png'} does not exist\n")


def test_finetune_unreadable_checkpoint_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_image_folder(tmp_path / "ds", {"red": 3, "teal": 3}, size=(32, 32))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    argv = ["finetune", str(tmp_path / "ds"), "--base-model", "tiny-R10x0.25"]
    argv += ["--out", str(tmp_path / "o"), "--checkpoint", str(bad), "--device", "cpu"]
    code, out, err = _run(argv, capsys)
    assert (code, out) == (2, "")
    assert err.splitlines()[-1].startswith(f"error: {bad} is not a readable BiT .npz checkpoint: ")
    assert not (tmp_path / "o").exists()


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"x": 2, "y": 3})
    done = subprocess.run(
        [sys.executable, "-m", "bitcore", "plan", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "images      5 valid (3 train, 2 validation), 0 rejected" in done.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "bitcore", "plan", str(tmp_path / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2
    assert missing.stderr == f"error: {tmp_path / 'nope'} is not a directory\n"


def test_finetune_then_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_image_folder(tmp_path / "ds", {"red": 6, "teal": 6}, size=(32, 32))
    out = tmp_path / "model"
    argv = ["finetune", str(tmp_path / "ds"), "--base-model", "tiny-R10x0.25", "--from-scratch"]
    argv += ["--out", str(out), "--device", "cpu", "--seed", "3"]
    for setting in ("steps=12", "batch_size=6", "precrop=36", "crop=32", "base_lr=0.01"):
        argv += ["--set", setting]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert stdout.startswith(f"artifact written to {out} (12 steps, ")
    assert sorted(p.name for p in out.iterdir()) == [
        "curves.csv",
        "curves.json",
        "curves.png",
        "metadata.json",
        "model.safetensors",
    ]
    assert "  steps          12 (warmup 2, decay at [5, 7, 10])" in err  # plan shown on stderr
    curves = json.loads((out / "curves.json").read_text())
    assert curves["schedule"] == {"warmup_steps": 2, "decay_steps": [5, 7, 10], "total_steps": 12}
    assert [p["step"] for p in curves["training"]] == list(range(1, 13))
    assert curves["training"][0]["lr"] == 0.0  # the schedule's first step (warm-up from 0)
    assert curves["training"][2]["lr"] == pytest.approx(0.01)  # after the 2 warm-up steps
    assert [p["step"] for p in curves["validation"]] == [3, 6, 9, 12]  # 3 inside, and the end
    metadata = json.loads((out / "metadata.json").read_text())
    assert curves["validation"][-1]["accuracy"] == metadata["metrics"]["accuracy"]
    assert curves["validation"][-1]["loss"] == pytest.approx(metadata["metrics"]["loss"])
    csv_lines = (out / "curves.csv").read_text().splitlines()
    assert csv_lines[0] == "step,loss,lr,images_per_second,val_accuracy,val_loss"
    assert len(csv_lines) == 13 and csv_lines[3].startswith("3,")
    assert csv_lines[3].split(",")[4] != "" and csv_lines[1].split(",")[4] == ""
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "training curves: " in err
    assert not (tmp_path / "model.work" / "curves.pending.json").exists()

    images = [tmp_path / "ds" / "red" / "red_000.png", tmp_path / "ds" / "teal" / "teal_005.png"]
    code, stdout, err = _run(["predict", str(out), *map(str, images), "--top-k", "5"], capsys)
    assert code == 0, err
    lines = stdout.splitlines()
    assert [lines[0], lines[3]] == [str(images[0]), str(images[1])]
    assert [lines[1].split()[1], lines[4].split()[1]] == ["red", "teal"]  # learnt the colours
    for first, second in ((lines[1], lines[2]), (lines[4], lines[5])):
        top, runner_up = float(first.split()[0]), float(second.split()[0])
        assert top > runner_up and top + runner_up == pytest.approx(1.0, abs=2e-4)
    assert len(lines) == 6  # top-k 5 is clamped to the 2 classes

    (tmp_path / "notes.png").write_text("not an image")
    code, _, err = _run(["predict", str(out), str(images[0]), str(tmp_path / "notes.png")], capsys)
    assert code == 2
    assert err == (
        f"error: cannot use {tmp_path / 'notes.png'}: not an allowed image type "
        "(JPEG, PNG, WEBP, BMP, GIF)\n"
    )


def test_finetune_with_int8_serving_reports_the_guard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_image_folder(tmp_path / "ds", {"red": 6, "teal": 6}, size=(32, 32))
    out = tmp_path / "model"
    argv = ["finetune", str(tmp_path / "ds"), "--base-model", "tiny-R10x0.25", "--from-scratch"]
    argv += ["--out", str(out), "--device", "cpu", "--seed", "3", "--serving-precision", "int8"]
    argv += ["--validation-fraction", "0.34"]
    for setting in ("steps=12", "batch_size=6", "precrop=36", "crop=32", "base_lr=0.01"):
        argv += ["--set", setting]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    check = json.loads((out / "metadata.json").read_text())["metrics"]["precision"]
    assert (check["requested"], check["validation_images"], check["calibration_images"]) == (
        "int8",
        4,
        8,
    )
    assert stdout.rstrip().endswith(f"; serving {check['served']}: {check['reason']}")
    files = sorted(p.name for p in out.iterdir())
    assert ("model.int8.onnx" in files) == (check["served"] == "int8")
    code, _, err = _run([*argv[:-2], "--serving-precision", "bf16"], capsys)
    assert code == 2 and "invalid choice: 'bf16'" in err


def test_checkpoints_list_and_pull_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITSERVE_CHECKPOINT_DIR", str(tmp_path))
    (tmp_path / "BiT-M-R50x1.npz").write_bytes(b"")
    code, out, _ = _run(["checkpoints", "list"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[:2] == [
        f"checkpoint directory: {tmp_path}",
        "name                      download  present  upstream",
    ]
    assert "BiT-M-R50x1                260 MiB  yes      ImageNet-21k" in lines
    assert "BiT-S-R50x1                 97 MiB  no       ImageNet-1k (ILSVRC-2012)" in lines

    code, _, err = _run(["checkpoints", "pull", "BiT-X-R1"], capsys)
    assert (code, err) == (
        2,
        "error: unknown checkpoint 'BiT-X-R1'; did you mean BiT-S-R50x1? see "
        "`python -m bitcore checkpoints list`\n",
    )
    with socket.socket() as probe:  # a loopback port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("BITSERVE_CHECKPOINT_BASE_URL", f"http://127.0.0.1:{port}")
    code, out, err = _run(["checkpoints", "pull", "BiT-S-R50x1"], capsys)
    assert code == 2 and "is plain http: use https" in err  # refused before any request
    monkeypatch.setenv("BITSERVE_ALLOW_INSECURE_MIRROR", "1")
    code, out, err = _run(["checkpoints", "pull", "BiT-S-R50x1"], capsys)
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith(
        f"error: network failure fetching http://127.0.0.1:{port}/BiT-S-R50x1.npz"
    )
    assert not (tmp_path / "BiT-S-R50x1.npz").exists()
