"""bitcore.artifacts: safetensors + JSON artifacts, never pickle."""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from bitcore.artifacts import (
    METADATA_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    ArtifactMetadata,
    ArtifactMissing,
    file_sha256,
    load_metadata,
    load_model,
    load_weights,
    save_artifact,
)
from bitcore.models import create_model

MODEL = "tiny-R10x0.25"
CLASSES = ["cat", "dog", "emu"]


def trained_like_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(MODEL, len(CLASSES))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # GN and head no longer at their init
    return model


def metadata() -> ArtifactMetadata:
    return ArtifactMetadata(
        model_name=MODEL,
        classes=list(CLASSES),
        crop=64,
        plan={"steps": 500, "base_lr": 0.003},
        metrics={"val_accuracy": 0.875},
        base_model="BiT-M-R50x1",
        extra={"seed": 7},
    )


@pytest.fixture
def artifact(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = trained_like_model()
    return save_artifact(tmp_path / "artifact", model, metadata()), model


def test_round_trip_is_exact(artifact):
    path, model = artifact
    assert sorted(p.name for p in path.iterdir()) == sorted([WEIGHTS_FILE, METADATA_FILE])
    loaded, meta = load_model(path)
    assert meta == replace(metadata(), weights_sha256=file_sha256(path / WEIGHTS_FILE))
    original = model.state_dict()
    restored = loaded.state_dict()
    assert list(original) == list(restored)
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    assert not loaded.training
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_metadata_file_is_plain_json(artifact):
    path, _ = artifact
    data = json.loads((path / METADATA_FILE).read_text())
    assert data["format"] == "bitserve-artifact" and data["format_version"] == 1
    assert data["input"] == {
        "crop": 64,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "resize": "bilinear, whole image squashed to crop x crop (aspect ratio not kept, "
        "nothing cut off)",
    }
    assert data["classes"] == CLASSES
    assert data["weights_sha256"] == hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert replace(load_metadata(path), weights_sha256=None) == metadata()


def test_pickle_named_safetensors_is_refused(artifact, tmp_path: Path):
    path, model = artifact
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # would run on unpickling
            return (marker.write_text, ("unpickled!",))

    with open(path / WEIGHTS_FILE, "wb") as fh:
        pickle.dump({"state": model.state_dict(), "x": Payload()}, fh)
    _without_checksum(path)
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        load_weights(path)
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        load_model(path)
    assert not marker.exists()


def test_torch_save_file_is_refused(artifact):
    path, model = artifact
    torch.save(model.state_dict(), path / WEIGHTS_FILE)
    _without_checksum(path)
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        load_model(path)


def test_missing_files(tmp_path: Path, artifact):
    with pytest.raises(ArtifactMissing, match="not a bitserve artifact directory"):
        load_metadata(tmp_path / "nowhere")
    path, _ = artifact
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactMissing, match="safetensors weights only"):
        load_model(path)


def _write_meta(path: Path, data: Any) -> None:
    (path / METADATA_FILE).write_text(json.dumps(data) if not isinstance(data, str) else data)


def _without_checksum(path: Path) -> None:
    """As an artifact written before checksums: the checks after the checksum still refuse."""
    data = json.loads((path / METADATA_FILE).read_text())
    data.pop("weights_sha256")
    _write_meta(path, data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format="other"), "not a bitserve-artifact metadata file"),
        (lambda d: d.update(format_version=2), "unsupported artifact format_version 2"),
        (lambda d: d.pop("model_name"), "missing or has a bad field: 'model_name'"),
        (lambda d: d.update(input={}), "missing or has a bad field: 'crop'"),
        (lambda d: d["input"].update(crop="large"), "missing or has a bad field"),
        (lambda d: d.update(classes="cat"), "'classes' must be a non-empty list"),
        (lambda d: d.update(classes=[]), "'classes' must be a non-empty list"),
        (lambda d: d.update(classes=["a", "a", "b"]), "duplicate names"),
    ],
)
def test_bad_metadata(artifact, change, message):
    path, _ = artifact
    data = json.loads((path / METADATA_FILE).read_text())
    change(data)
    _write_meta(path, data)
    with pytest.raises(ArtifactError, match=message):
        load_metadata(path)


@pytest.mark.parametrize(
    ("text", "message"), [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")]
)
def test_metadata_not_json_object(artifact, text, message):
    path, _ = artifact
    _write_meta(path, text)
    with pytest.raises(ArtifactError, match=message):
        load_metadata(path)


def test_weights_for_another_model_are_refused(artifact):
    path, _ = artifact
    data = json.loads((path / METADATA_FILE).read_text())
    data["classes"] = ["a", "b"]  # head in the file has 3 outputs
    _write_meta(path, data)
    with pytest.raises(ArtifactError, match=r"weights do not match tiny-R10x0\.25"):
        load_model(path)
    data["classes"], data["model_name"] = CLASSES, "BiT-Q-R9"
    _write_meta(path, data)
    with pytest.raises(ArtifactError, match=r"cannot build.*BiT-Q-R9"):
        load_model(path)


def test_missing_and_extra_tensors_are_refused(artifact):
    path, model = artifact
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del state["body.block2.unit01.gn1.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(path / WEIGHTS_FILE))
    _without_checksum(path)
    with pytest.raises(ArtifactError, match=r"missing \['body\.block2\.unit01\.gn1\.weight'\]"):
        load_model(path)


def test_save_leaves_no_temp_files_and_overwrites(artifact):
    path, _ = artifact
    other = create_model(MODEL, len(CLASSES), zero_head=True)
    save_artifact(path, other, metadata())
    assert sorted(p.name for p in path.iterdir()) == sorted([WEIGHTS_FILE, METADATA_FILE])
    loaded: Any
    loaded, _ = load_model(path)
    assert torch.count_nonzero(loaded.head.conv.weight) == 0


def test_a_flipped_bit_in_the_tensor_data_is_caught_by_the_checksum(artifact):
    path, _ = artifact
    weights = path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # in the last tensor's bytes: safetensors alone would load it
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"is damaged: its SHA-256 is [0-9a-f]{64}"):
        load_model(path)
    _without_checksum(path)  # what an artifact without a checksum would do: serve it silently
    load_model(path)


def test_a_truncated_weights_file_is_refused(artifact):
    path, _ = artifact
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="is damaged"):
        load_model(path)
    _without_checksum(path)
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        load_model(path)


def test_a_bad_checksum_field_is_refused(artifact):
    path, _ = artifact
    data = json.loads((path / METADATA_FILE).read_text())
    data["weights_sha256"] = 12
    _write_meta(path, data)
    with pytest.raises(ArtifactError, match="weights_sha256 must be a string"):
        load_metadata(path)


def test_metadata_keeps_no_host_paths_issue_11() -> None:
    """Downloaded metadata.json carried the dataset's absolute root (issue 11)."""
    from bitcore.artifacts import ArtifactMetadata, software_versions, without_host_paths

    extra = {
        "dataset": {"root": "/srv/bitserve/store/datasets/ds_x/files", "num_images": 8},
        "cache": "C:\\bitserve\\cache",
        "home": "~/bitserve",
        "notes": ["/etc/passwd", "kept"],
        "timings": {"train_seconds": 1.5},
        "software": software_versions(),
    }
    document = ArtifactMetadata("tiny-R10x0.25", ["a", "b"], 32, extra=extra).to_dict()
    assert document["extra"] == {
        "dataset": {"num_images": 8},
        "notes": ["kept"],
        "timings": {"train_seconds": 1.5},
        "software": software_versions(),
    }
    assert without_host_paths({"relative": "a/b.png"}) == {"relative": "a/b.png"}
    assert all(v.count(".") == 1 for v in software_versions().values())
