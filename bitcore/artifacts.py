"""Fine-tuned model artifacts: safetensors weights + JSON metadata, never pickle.

Layout of an artifact directory:
    model.safetensors   the state dict of the training-form model (StdConv2d kernels unstandardised)
    metadata.json       format version, model name, classes, plan, preprocessing, metrics
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bitcore.atomic import atomic_write, write_json_atomic
from bitcore.models import create_model

FORMAT = "bitserve-artifact"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
# The BiT input convention: RGB in [-1, 1] = (x/255 - 0.5) / 0.5.
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)


class ArtifactError(ValueError):
    """The directory is not a valid bitserve artifact; the message says what is wrong."""


@dataclass
class ArtifactMetadata:
    model_name: str  # registry name of the architecture, e.g. "BiT-M-R50x1"
    classes: list[str]
    crop: int
    plan: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None  # the checkpoint it was fine-tuned from (None: from scratch)
    extra: dict[str, Any] = field(default_factory=dict)  # timings, seed, dataset facts...

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "base_model": self.base_model,
            "classes": list(self.classes),
            "input": {"crop": self.crop, "mean": list(INPUT_MEAN), "std": list(INPUT_STD)},
            "plan": self.plan,
            "metrics": self.metrics,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArtifactMetadata:
        if data.get("format") != FORMAT:
            raise ArtifactError(f"not a {FORMAT} metadata file (format={data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"unsupported artifact format_version {data.get('format_version')}")
        classes = data.get("classes")
        if not isinstance(classes, list) or not classes:
            raise ArtifactError(
                f"artifact metadata 'classes' must be a non-empty list, got {classes!r}"
            )
        if len(set(map(str, classes))) != len(classes):
            raise ArtifactError("artifact metadata 'classes' has duplicate names")
        try:
            return cls(
                model_name=str(data["model_name"]),
                classes=[str(c) for c in data["classes"]],
                crop=int(data["input"]["crop"]),
                plan=dict(data.get("plan") or {}),
                metrics=dict(data.get("metrics") or {}),
                base_model=data.get("base_model"),
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"artifact metadata is missing or has a bad field: {exc}") from exc


def save_artifact(out_dir: str | Path, model: torch.nn.Module, metadata: ArtifactMetadata) -> Path:
    """Write weights and metadata; each file lands atomically, mode 0o644 (`bitcore.atomic`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT, "model_name": metadata.model_name})
    write_json_atomic(out / METADATA_FILE, metadata.to_dict())
    return out


def load_metadata(artifact_dir: str | Path) -> ArtifactMetadata:
    path = Path(artifact_dir) / METADATA_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} not found: not a bitserve artifact directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} must hold a JSON object")
    return ArtifactMetadata.from_dict(data)


def load_weights(
    artifact_dir: str | Path, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read the safetensors weights. Anything else (a pickle, a .pt) is refused."""
    path = Path(artifact_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} not found: artifacts hold safetensors weights only")
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ArtifactError(f"{path} is not a valid safetensors file: {exc}") from exc


def load_model(
    artifact_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, ArtifactMetadata]:
    """Rebuild the registry model and load its weights strictly (a mismatch is an error)."""
    meta = load_metadata(artifact_dir)
    try:
        model = create_model(meta.model_name, len(meta.classes))
    except ValueError as exc:  # unknown architecture name
        raise ArtifactError(f"artifact metadata names a model bitcore cannot build: {exc}") from exc
    state = load_weights(artifact_dir)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch, e.g. a head for another number of classes
        raise ArtifactError(f"weights do not match {meta.model_name}: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ArtifactError(
            f"weights do not match {meta.model_name}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.to(device).eval(), meta
