"""`python -m bitcore` fails fast, before any image is decoded, with one line and exit 2 for
every mistake issue 17 found (real CLI in a subprocess); help, --version, "did you mean"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bitcore
from bitcore.cli_checks import FROM_SCRATCH_MODELS
from tests.imagegen import make_image_folder

REPO = Path(__file__).resolve().parents[2]
TINY = ["--base-model", "tiny-R10x0.25", "--device", "cpu"]


def bitcore_cli(*args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-m", "bitcore", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a refused command (exit 2, nothing on stdout): no summary
    (printed after decoding), no progress, no traceback."""
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ds"), {"red": 4, "teal": 4}, size=(32, 32))


def test_out_is_a_file(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "model").write_text("notes")
    line = one_line_error(
        bitcore_cli(
            "finetune", str(dataset), *TINY, "--from-scratch", "--out", str(tmp_path / "model")
        )
    )
    assert (
        line
        == f"error: --out {tmp_path / 'model'} is an existing file; name a folder for the artifact"
    )


def test_out_dot_in_a_non_empty_folder(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    line = one_line_error(
        bitcore_cli("finetune", str(dataset), *TINY, "--from-scratch", "--out", ".", cwd=tmp_path)
    )
    assert line == (
        "error: --out . is the current folder with other files in it (not an artifact); name a "
        "new or empty folder, or add --overwrite to write into it"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_existing_artifact_and_unrelated_folder_need_overwrite(
    dataset: Path, tmp_path: Path
) -> None:
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "metadata.json").write_text("{}")
    line = one_line_error(
        bitcore_cli("finetune", str(dataset), *TINY, "--from-scratch", "--out", str(artifact))
    )
    assert line == (
        f"error: --out {artifact} already holds an artifact; add --overwrite to replace it, or "
        "choose another --out"
    )
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    line = one_line_error(
        bitcore_cli("finetune", str(dataset), *TINY, "--from-scratch", "--out", str(other))
    )
    assert line.startswith(f"error: --out {other} is a folder with other files in it")
    line = one_line_error(
        bitcore_cli("finetune", str(dataset), *TINY, "--from-scratch", "--out", str(dataset / "m"))
    )
    assert line.startswith(f"error: --out {dataset / 'm'} overlaps the dataset folder")


def test_from_scratch_model_without_the_flag_names_the_flag(dataset: Path, tmp_path: Path) -> None:
    line = one_line_error(
        bitcore_cli("finetune", str(dataset), *TINY, "--out", str(tmp_path / "m"))
    )
    assert line == (
        "error: tiny-R10x0.25 is not a published BiT model and has no pre-trained checkpoint; "
        "pass --from-scratch to train it from random initialisation"
    )
    assert "=True" not in line and not (tmp_path / "m.work").exists()


def test_missing_catalog_checkpoint_before_decoding(dataset: Path, tmp_path: Path) -> None:
    line = one_line_error(
        bitcore_cli(
            "finetune",
            str(dataset),
            "--base-model",
            "BiT-S-R50x1",
            "--out",
            str(tmp_path / "m"),
            BITSERVE_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
        )
    )
    assert line.startswith("error: checkpoint BiT-S-R50x1 is not available (not downloaded yet ")
    assert "python -m bitcore checkpoints pull BiT-S-R50x1); or pass --from-scratch" in line


def test_did_you_mean_for_models_and_set_keys(dataset: Path, tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "m")]
    line = one_line_error(
        bitcore_cli("finetune", str(dataset), "--base-model", "bit-m-r50x1", *out)
    )
    assert line.startswith("error: unknown base model 'bit-m-r50x1'; did you mean BiT-M-R50x1? ")
    assert line.endswith("(from scratch: tiny-R10x0.25, small-R26x0.5)")
    line = one_line_error(bitcore_cli("plan", str(dataset), "--set", "Steps=5", "--set", "lr=1"))
    assert line == (
        "error: unknown override(s) ['Steps', 'lr'] for --set; did you mean steps? allowed: "
        "steps, warmup_steps, batch_size, micro_batch_size, base_lr, crop, precrop, mixup_alpha"
    )


def test_flat_folder_counts_its_loose_images(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "nested", {"a": 20, "b": 20}, size=(16, 16))
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in (tmp_path / "nested").rglob("*.png"):
        image.rename(flat / image.name)
    line = one_line_error(bitcore_cli("plan", str(flat)))
    assert line == (
        f"error: need at least 2 class folders, found 0; 40 images sit directly in {flat}: put "
        f"them in one sub-folder per class ({flat}/<class>/<image>)"
    )


def test_predict_names_the_wrong_kind_of_path(dataset: Path, tmp_path: Path) -> None:
    image = dataset / "red" / "red_000.png"
    line = one_line_error(bitcore_cli("predict", str(image), str(image)))
    assert line.startswith(f"error: {image} is a file, not an artifact directory")
    line = one_line_error(bitcore_cli("predict", str(dataset), str(image)))
    assert line.startswith(
        f"error: {dataset} is a folder but not an artifact: it has no metadata.json"
    )
    (tmp_path / "metadata.json").write_text("{}")
    line = one_line_error(bitcore_cli("predict", str(tmp_path), str(dataset / "red")))
    assert (
        line
        == f"error: image {dataset / 'red'} is a folder; name image files (e.g. {dataset / 'red'}/*.jpg)"
    )


def test_version_help_defaults_and_examples() -> None:
    done = bitcore_cli("--version")
    assert (done.returncode, done.stdout) == (0, f"bitcore {bitcore.__version__}\n")
    for command in (["plan"], ["finetune"], ["predict"], ["checkpoints"], ["checkpoints", "list"]):
        done = bitcore_cli(*command, "--help")
        assert done.returncode == 0 and "\nexamples:\n  python -m bitcore " in done.stdout, command
    tune = bitcore_cli("finetune", "--help").stdout
    flat = " ".join(tune.split())
    assert "share of each class held out to validate, in [0, 1) (default: 0.1)" in flat
    assert "--from-scratch: tiny-R10x0.25, small-R26x0.5" in flat
    assert "(default: code)" in flat and "--restart" in flat and "--keep-cache" in flat
    assert "image files (JPEG, PNG, ...)" in " ".join(
        bitcore_cli("predict", "--help").stdout.split()
    )


def test_from_scratch_list_matches_the_registry() -> None:
    from bitcore.models import MODEL_SPECS

    assert set(FROM_SCRATCH_MODELS) == {n for n, s in MODEL_SPECS.items() if not s.published}


def test_checkpoints_list_json_and_from_scratch_line(tmp_path: Path) -> None:
    (tmp_path / "BiT-M-R50x1.npz").write_bytes(b"")
    done = bitcore_cli("checkpoints", "list", "--json", BITSERVE_CHECKPOINT_DIR=str(tmp_path))
    document = json.loads(done.stdout)
    assert document["directory"] == str(tmp_path)
    assert document["from_scratch"] == ["tiny-R10x0.25", "small-R26x0.5"]
    row = next(r for r in document["checkpoints"] if r["name"] == "BiT-M-R50x1")
    assert (row["present"], row["architecture"], row["upstream"]) == (
        True,
        "BiT-M-R50x1",
        "ImageNet-21k",
    )
    done = bitcore_cli("checkpoints", "list", BITSERVE_CHECKPOINT_DIR=str(tmp_path))
    assert done.stdout.splitlines()[-1] == (
        "from scratch (no checkpoint, finetune --from-scratch): tiny-R10x0.25, small-R26x0.5"
    )
