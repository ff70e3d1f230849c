"""ONNX export of a fine-tuned model: the serving form (WS folded, eval mode), dynamic batch.

The graph takes what `bitcore.transforms.eval_preprocess` produces and returns logits:
    input   "input"   float32 (N, 3, crop, crop), RGB, NCHW, N free
    output  "logits"  float32 (N, num_classes); softmax over axis 1 gives the served scores
Preprocessing (not in the graph, done by the caller): decode to RGB, resize the whole image to
crop x crop with bilinear filtering (a squash: the aspect ratio is not kept and nothing is cut
off), then (x / 255 - mean) / std per channel with mean = std = 0.5, i.e. [-1, 1]. The same
facts are written into the file's metadata_props (PREPROCESS_KEYS) so that a downloaded .onnx
is usable without bitserve, and into metadata.json's "input" (bitcore.artifacts).

The exporter is torch's TorchScript-based one (`dynamo=False`): it needs only the `onnx`
package (the dynamo exporter would add onnxscript) and handles this plain conv/GroupNorm net.
A protobuf file holds at most 2 GiB: larger models (BiT-M-R152x4) are refused (ExportError)
rather than written as a folder of external-data files.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from bitcore.artifacts import INPUT_MEAN, INPUT_RESIZE, INPUT_STD, ArtifactMetadata, load_model
from bitcore.atomic import atomic_write
from bitcore.layers import StdConv2d, fold_weight_standardization

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
FORMAT = "bitserve-onnx"
# Bump when the exported graph changes: a cached model.onnx of another version is re-exported.
EXPORT_VERSION = "1"
# protobuf's hard limit for one message, less room for the graph itself.
MAX_WEIGHT_BYTES = (2 << 30) - (64 << 20)
RESIZE = INPUT_RESIZE


class ExportError(ValueError):
    """The model cannot be exported to ONNX; the message says why."""


def preprocessing(crop: int) -> dict[str, str]:
    """The input contract, as metadata_props strings (ONNX metadata values are strings)."""
    return {
        "input.name": INPUT_NAME,
        "input.layout": "NCHW float32 RGB, batch axis dynamic",
        "input.crop": str(int(crop)),
        "input.resize": RESIZE,
        "input.normalize": "(x / 255 - mean) / std per channel",
        "input.mean": json.dumps(list(INPUT_MEAN)),
        "input.std": json.dumps(list(INPUT_STD)),
        "output.name": OUTPUT_NAME,
        "output.meaning": "logits (N, num_classes) in the order of 'classes'; softmax -> scores",
    }


def export_onnx_bytes(
    model: nn.Module,
    *,
    crop: int,
    classes: Sequence[str],
    model_name: str,
    weights_sha256: str | None = None,
    opset: int = OPSET,
) -> bytes:
    """The serialised ONNX model of a prepared module (eval mode, WS folded, on the CPU).

    `model` is not modified. A module still holding StdConv2d layers is exported from a folded
    copy: the graph then needs no per-forward standardisation.
    """
    import onnx  # imported here: only export and the onnxruntime runtime need it

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if weight_bytes > MAX_WEIGHT_BYTES:
        raise ExportError(
            f"{model_name} has {weight_bytes / 2**30:.1f} GiB of weights: an ONNX file holds at "
            "most 2 GiB (external-data export is not supported yet)"
        )
    module = serving_form(model)
    example = torch.zeros((1, 3, int(crop), int(crop)))
    buffer = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The tracer's notes (a Python bool taken from a shape, Slice not constant-folded) are
        # about shapes that are fixed per batch here; they would only clutter the service log.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter takes a binary stream
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    props = {
        "bitserve.format": FORMAT,
        "bitserve.export_version": EXPORT_VERSION,
        "model_name": model_name,
        "classes": json.dumps([str(c) for c in classes]),
        "weights_sha256": weights_sha256 or "",
        **preprocessing(crop),
    }
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "bitserve"
    proto.doc_string = (
        f"{model_name} fine-tuned by bitserve, {len(classes)} classes. Input: {RESIZE}; "
        f"{crop}x{crop}; (x/255 - 0.5)/0.5 -> [-1, 1]; NCHW float32. Output: logits."
    )
    onnx.checker.check_model(proto)
    data: bytes = proto.SerializeToString()
    return data


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file (raises ExportError if it is not one)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(f"{path} is not a readable ONNX file: {exc}") from exc
    return {p.key: p.value for p in proto.metadata_props}


def ensure_onnx(
    artifact_dir: str | Path,
    *,
    model: nn.Module | None = None,
    meta: ArtifactMetadata | None = None,
) -> Path:
    """The artifact's model.onnx, exported now unless a current one is already there.

    Current = written by this export version for these weights (metadata.json's
    weights_sha256). `model` (the loaded module) and `meta` save reading the artifact again.
    Written atomically: concurrent exporters (two API processes) each rename a whole file.
    """
    directory = Path(artifact_dir)
    path = directory / ONNX_FILE
    if model is None or meta is None:
        model, meta = load_model(directory, device="cpu")
    if path.is_file() and _is_current(path, meta):
        return path
    data = export_onnx_bytes(
        model,
        crop=meta.crop,
        classes=meta.classes,
        model_name=meta.model_name,
        weights_sha256=meta.weights_sha256,
    )
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    log.info("exported %s to ONNX (%d bytes)", directory.name, len(data))
    return path


def _is_current(path: Path, meta: ArtifactMetadata) -> bool:
    try:
        props = read_metadata(path)
    except ExportError:
        return False  # damaged or half-written by a crashed older version: export again
    return (
        props.get("bitserve.export_version") == EXPORT_VERSION
        and props.get("weights_sha256", "") == (meta.weights_sha256 or "")
        and props.get("classes") == json.dumps([str(c) for c in meta.classes])
    )


def serving_form(model: nn.Module) -> nn.Module:
    """`model` itself when it is already in the serving form on the CPU, else a folded,
    eval-mode CPU copy (the caller's module, e.g. a predictor's on a GPU, is never moved)."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    folded = not any(isinstance(m, StdConv2d) for m in model.modules())
    if on_cpu and folded and not model.training:
        return model
    copied = copy.deepcopy(model).eval().cpu()
    return fold_weight_standardization(copied)
