"""Fine-tuned model artifacts: safetensors weights + JSON metadata, never pickle.

Layout of an artifact directory:
    model.safetensors   the state dict of the training-form model (StdConv2d kernels unstandardised)
    metadata.json       format version, model name, classes, plan, preprocessing, metrics, and
                        the SHA-256 of model.safetensors (`weights_sha256`)

The checksum is how a damaged file is caught at load: safetensors itself notices a truncated
file (its header promises more bytes than there are) but not a flipped bit in the tensor data,
which would serve wrong scores without a word. Hashing costs about a second per GB of weights,
once per load. Artifacts written before the checksum existed load without the check.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field, replace
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
# How an image becomes the crop (bitcore.transforms.eval_preprocess): recorded with the model so
# that its downloaded artifact (.zip or .onnx) can be used without bitserve.
INPUT_RESIZE = (
    "bilinear, whole image squashed to crop x crop (aspect ratio not kept, nothing cut off)"
)


HASH_CHUNK_BYTES = 1 << 20


class ArtifactError(ValueError):
    """The directory is not a valid bitserve artifact (damaged or not one at all); the message
    says what is wrong."""


class ArtifactMissing(ArtifactError):
    """A file of the artifact is not there at all."""


@dataclass
class ArtifactMetadata:
    model_name: str  # registry name of the architecture, e.g. "BiT-M-R50x1"
    classes: list[str]
    crop: int
    plan: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None  # the checkpoint it was fine-tuned from (None: from scratch)
    extra: dict[str, Any] = field(default_factory=dict)  # timings, seed, dataset facts...
    weights_sha256: str | None = None  # filled by save_artifact; None in older artifacts

    def to_dict(self) -> dict[str, Any]:
        """The metadata.json document; `extra` without host paths (see without_host_paths)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "base_model": self.base_model,
            "classes": list(self.classes),
            "input": {
                "crop": self.crop,
                "mean": list(INPUT_MEAN),
                "std": list(INPUT_STD),
                "resize": INPUT_RESIZE,
            },
            "plan": self.plan,
            "metrics": self.metrics,
            "extra": without_host_paths(self.extra),
            "weights_sha256": self.weights_sha256,
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
                weights_sha256=_optional_str(data.get("weights_sha256")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"artifact metadata is missing or has a bad field: {exc}") from exc


def without_host_paths(value: Any) -> Any:
    """`value` (JSON-like) without the strings that are absolute file system paths.

    metadata.json travels: it is downloaded with the model (GET /v1/models/{id}/artifact) and
    copied elsewhere. A path of the server's ("/srv/bitserve/store/datasets/ds_…") tells a
    downloader how the server is laid out and names other tenants' objects' places, and is of
    no use where the artifact goes. Facts, timings and versions stay; a dict entry whose value
    is such a path is dropped, a list item too.
    """
    if isinstance(value, dict):
        return {k: without_host_paths(v) for k, v in value.items() if not _is_host_path(v)}
    if isinstance(value, list | tuple):
        return [without_host_paths(v) for v in value if not _is_host_path(v)]
    return value


def _is_host_path(value: Any) -> bool:
    if isinstance(value, Path):
        return True
    if not isinstance(value, str):
        return False
    return value.startswith(("/", "~", "\\\\")) or (
        len(value) > 2 and value[1] == ":" and value[2] in "/\\" and value[0].isalpha()
    )


def software_versions() -> dict[str, str]:
    """torch and Python as major.minor: what the weights' format depends on."""
    torch_version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return {"torch": torch_version, "python": ".".join(platform.python_version_tuple()[:2])}


def save_artifact(out_dir: str | Path, model: torch.nn.Module, metadata: ArtifactMetadata) -> Path:
    """Write weights and metadata; each file lands atomically, mode 0o600 (`bitcore.atomic`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT, "model_name": metadata.model_name})
        digest = file_sha256(tmp)  # read back from the page cache: the bytes that were written
    # Metadata last: an artifact with metadata.json is complete, and it names its weights.
    write_json_atomic(out / METADATA_FILE, replace(metadata, weights_sha256=digest).to_dict())
    return out


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _optional_str(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"weights_sha256 must be a string, got {value!r}")
    return value


def load_metadata(artifact_dir: str | Path) -> ArtifactMetadata:
    path = Path(artifact_dir) / METADATA_FILE
    if not path.is_file():
        raise ArtifactMissing(f"{path} not found: not a bitserve artifact directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} must hold a JSON object")
    return ArtifactMetadata.from_dict(data)


def load_weights(
    artifact_dir: str | Path, device: str | torch.device = "cpu", *, sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """Read the safetensors weights. Anything else (a pickle, a .pt) is refused; with `sha256`,
    so is a file whose checksum differs (damaged on disk)."""
    path = Path(artifact_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactMissing(f"{path} not found: artifacts hold safetensors weights only")
    if sha256 is not None:
        try:
            actual = file_sha256(path)
        except OSError as exc:
            raise ArtifactError(f"{path} cannot be read: {exc}") from exc
        if actual != sha256:
            raise ArtifactError(
                f"{path} is damaged: its SHA-256 is {actual}, metadata.json records {sha256}"
            )
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
    state = load_weights(artifact_dir, sha256=meta.weights_sha256)
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
