"""Int8 serving, per model and off by default: static quantization of the exported graph,
kept only if it answers like the float32 model on the model's own validation split.

Why int8 and not bf16: bf16 pays only on CPUs with native bf16 units (AVX-512 BF16, AMX) and
on GPUs, where bitserve's eager path already autocasts; on the AVX2 CPUs most serving nodes
have, bf16 is emulated and slower than float32. Int8 convolutions run on every x86 CPU with
AVX2 (and faster with VNNI). Measured in benchmarks/RESULTS.md, "Int8 serving (issue 13)".

How (ONNX Runtime's static quantization, `quantize_int8`): the float32 graph of
bitcore.export gets QuantizeLinear/DequantizeLinear pairs around its convolutions and head
(QDQ format), weights per output channel in int8, activations in uint8 with ranges calibrated
(min/max) on CALIBRATION_IMAGES images of the training split, preprocessed as at inference.
Weights use 7 bits (`reduce_range`): without VNNI, x86's u8 x s8 multiply-add saturates 16-bit
sums on 8-bit weights, and the node that quantizes (a worker) and the nodes that serve (the
gateways) may have different CPUs. With 7-bit weights both give the same integers.

The guard (`int8_guard`): top-1 agreement of the int8 graph with the float32 model on every
image of the validation split. At least MIN_AGREEMENT (99.5%) and the int8 graph is written
next to the weights (INT8_FILE) and served; below it, or with no validation images to measure
on, the model stays float32. Either way the outcome (`PrecisionCheck`) is recorded in the
model's metrics, so the figure is visible in `GET /v1/models/{id}`.

At load (bitcore.predict), the int8 graph must match the SHA-256 recorded by the guard, and it
is checked against eager float32 on the runtime's fixed inputs like any runtime, with a
tolerance of the difference the guard itself measured there plus INT8_LOAD_SLACK: a graph that
differs from the one the guard accepted (another file, a CPU that computes it differently)
is refused rather than served.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitcore.artifacts import ArtifactError, ArtifactMissing
from bitcore.atomic import atomic_write
from bitcore.runtimes import ONNXRUNTIME, OnnxRuntimeForward, check_against_eager, check_inputs

log = logging.getLogger(__name__)

FP32 = "fp32"
INT8 = "int8"
PRECISIONS = (FP32, INT8)
INT8_FILE = "model.int8.onnx"
MIN_AGREEMENT = 0.995
CALIBRATION_IMAGES = 64
# Over the guard's own figure on the fixed inputs: float reordering between two CPUs moves
# probabilities by ~1e-6; a different graph or integer arithmetic moves them by hundredths.
INT8_LOAD_SLACK = 5e-3
INT8_RUNTIME = f"{ONNXRUNTIME} (int8)"


def validate_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"unknown serving precision {name!r}; expected one of {PRECISIONS}")
    return name


@dataclass(frozen=True)
class PrecisionCheck:
    """What the int8 guard measured and decided (stored as metrics["precision"])."""

    requested: str  # "int8"
    served: str  # "int8" when the guard passed, else "fp32"
    agreement: float | None  # top-1 agreement with float32 on the validation split
    agreeing: int
    validation_images: int
    threshold: float
    calibration_images: int
    check_max_diff: float | None  # int8 vs float32 probabilities on the fixed check inputs
    int8_sha256: str | None
    reason: str  # one sentence: why served is what it is

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrecisionCheck:
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})  # type: ignore[arg-type]


def quantize_int8(fp32_onnx: bytes, calibration: Iterable[torch.Tensor]) -> bytes:
    """The int8 (QDQ) graph of an exported float32 graph; `calibration`: preprocessed
    (N, 3, crop, crop) batches whose activation ranges set the uint8 scales."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Batches(CalibrationDataReader):
        def __init__(self, batches: Iterator[torch.Tensor]) -> None:
            self.batches = batches

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch.float().contiguous().numpy()}

    with tempfile.TemporaryDirectory(prefix="bitserve-int8-") as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(fp32_onnx)
        quantize_static(
            source,
            target,
            _Batches(iter(calibration)),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return target.read_bytes()


def top1_agreement(
    reference: nn.Module, candidate: OnnxRuntimeForward, batches: Iterable[torch.Tensor]
) -> tuple[int, int]:
    """(images whose top-1 class is the same, images) of `candidate` against `reference`
    (the float32 serving-form model on the CPU) over preprocessed batches."""
    agreeing = total = 0
    with torch.inference_mode():
        for batch in batches:
            expected = reference(batch).argmax(dim=1)
            got = candidate(batch).argmax(dim=1)
            agreeing += int((expected == got).sum())
            total += len(batch)
    return agreeing, total


def probability_diff(reference: nn.Module, candidate: OnnxRuntimeForward, crop: int) -> float:
    """Largest |probability difference| on the runtimes' fixed check inputs."""
    inputs = check_inputs(crop)
    with torch.inference_mode():
        expected = reference(inputs).float().softmax(dim=1)
    got = candidate(inputs).float().softmax(dim=1)
    return float((got - expected).abs().max())


def int8_guard(
    model: nn.Module,
    fp32_onnx: bytes,
    calibration: Iterable[torch.Tensor],
    validation: Iterable[torch.Tensor],
    *,
    crop: int,
    out_dir: str | Path,
    threshold: float = MIN_AGREEMENT,
) -> PrecisionCheck:
    """Quantize, measure agreement on `validation`, and write INT8_FILE into `out_dir` only
    if it reaches `threshold`. `model`: the serving form (eval, WS folded) on the CPU."""
    calibration = list(calibration)
    calibrated = sum(len(batch) for batch in calibration)
    common = {"requested": INT8, "threshold": threshold, "calibration_images": calibrated}
    if not calibrated:
        (Path(out_dir) / INT8_FILE).unlink(missing_ok=True)
        return PrecisionCheck(
            served=FP32,
            agreement=None,
            agreeing=0,
            validation_images=0,
            check_max_diff=None,
            int8_sha256=None,
            reason="no training images to calibrate the int8 ranges on",
            **common,  # type: ignore[arg-type]
        )
    data = quantize_int8(fp32_onnx, calibration)
    forward = OnnxRuntimeForward(data, torch.device("cpu"))
    agreeing, total = top1_agreement(model, forward, validation)
    diff = probability_diff(model, forward, crop)
    agreement = agreeing / total if total else None
    if agreement is None:
        served, reason = FP32, "no validation images to measure int8 agreement on"
    elif agreement < threshold:
        served = FP32
        reason = (
            f"int8 agreed with float32 on {agreeing} of {total} validation images "
            f"({agreement:.2%}), under the required {threshold:.1%}"
        )
    else:
        served = INT8
        reason = (
            f"int8 agreed with float32 on {agreeing} of {total} validation images "
            f"({agreement:.2%}, at least {threshold:.1%} required)"
        )
    digest = None
    path = Path(out_dir) / INT8_FILE
    if served == INT8:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            tmp.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
    else:
        path.unlink(missing_ok=True)  # an earlier attempt's graph must not outlive its refusal
    log.info("int8 guard: %s; serving %s", reason, served)
    return PrecisionCheck(
        served=served,
        agreement=agreement,
        agreeing=agreeing,
        validation_images=total,
        check_max_diff=diff,
        int8_sha256=digest,
        reason=reason,
        **common,  # type: ignore[arg-type]
    )


def recorded_check(metrics: dict[str, Any]) -> PrecisionCheck | None:
    """The guard's outcome recorded in a model's metrics, if int8 was asked for."""
    recorded = metrics.get("precision")
    return PrecisionCheck.from_dict(recorded) if isinstance(recorded, dict) else None


def load_int8(
    artifact_dir: str | Path,
    check: PrecisionCheck,
    eager: nn.Module,
    device: torch.device,
    crop: int,
    *,
    threads: int | None = None,
) -> tuple[OnnxRuntimeForward, float]:
    """The int8 graph the guard accepted, checked: (its forward, the load check's figure).

    ArtifactMissing / ArtifactError when the file is absent or is not the one the guard
    measured (SHA-256); RuntimeMismatch when it answers unlike it did for the guard."""
    path = Path(artifact_dir) / INT8_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactMissing(f"{INT8_FILE} is missing: the model's int8 graph") from exc
    if hashlib.sha256(data).hexdigest() != check.int8_sha256:
        raise ArtifactError(f"{INT8_FILE} is not the graph the int8 guard accepted (SHA-256)")
    forward = OnnxRuntimeForward(data, device, threads=threads)
    tolerance = (check.check_max_diff or 0.0) + INT8_LOAD_SLACK
    max_diff = check_against_eager(eager, forward, crop, runtime=INT8_RUNTIME, tolerance=tolerance)
    return forward, max_diff
