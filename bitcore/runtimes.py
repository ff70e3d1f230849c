"""Where a predictor's forward pass runs: PyTorch eager ("torch"), ONNX Runtime or OpenVINO.

"onnxruntime" runs the exported graph (bitcore.export) in an InferenceSession: the CPU
execution provider, or CUDA's when the predictor's device is a GPU and the installed
onnxruntime has it. Its intra-op threads are the CPUs this process may really use (its
affinity mask), not the machine's count: on a container's cpuset, more threads than cores
only contend.

"openvino" runs the same exported graph compiled by OpenVINO for its CPU plugin
(bitcore.runtime_openvino, imported only when chosen). Both graph runtimes take the .onnx path
or bytes and are built by `graph_forward`.

Before a runtime other than eager serves, `check_against_eager` runs both on CHECK_IMAGES fixed
inputs and compares the softmax probabilities (what clients are sent) element-wise: a largest
absolute difference above CHECK_TOLERANCE (1e-3) raises RuntimeMismatch and the model is not
served. Probabilities rather than logits: they are the served numbers and lie in [0, 1], so
one absolute bound means the same for every model, whatever the scale of its logits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bitcore.cpus import available_cpus

log = logging.getLogger(__name__)

TORCH = "torch"
ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
RUNTIMES = (TORCH, ONNXRUNTIME, OPENVINO)
# The runtimes that run the exported ONNX graph (bitcore.export) rather than the nn.Module.
GRAPH_RUNTIMES = (ONNXRUNTIME, OPENVINO)
# Well above float32 reordering (measured 4e-8 to 4e-7, up to ~1e-4 for a model with logits
# near 20), far below what a wrong graph gives (a changed kernel: tenths): a good model is
# never refused for rounding, a broken one always is. The export itself is tested at 1e-4.
CHECK_TOLERANCE = 1e-3
CHECK_IMAGES = 2
CHECK_SEED = 13


# A graph runtime's forward: preprocessed (N, 3, H, W) float32 -> logits (N, C) float32, CPU.
Forward = Callable[[torch.Tensor], torch.Tensor]


class RuntimeMismatch(RuntimeError):
    """The runtime's outputs differ from PyTorch eager's: the model must not be served."""

    def __init__(self, runtime: str, max_diff: float, tolerance: float) -> None:
        super().__init__(
            f"the {runtime} runtime disagrees with PyTorch eager on the load check: softmax "
            f"probabilities differ by up to {max_diff:.3g} (allowed {tolerance:g})"
        )
        self.runtime = runtime
        self.max_diff = max_diff
        self.tolerance = tolerance


def validate_runtime(name: str) -> str:
    if name not in RUNTIMES:
        raise ValueError(f"unknown predict runtime {name!r}; expected one of {RUNTIMES}")
    return name


def graph_forward(
    runtime: str, model: str | Path | bytes, device: torch.device, *, threads: int | None = None
) -> Forward:
    """The forward of graph runtime `runtime` on the exported graph `model` (path or bytes);
    `threads`: intra-op threads (default: bitcore.cpus's figure)."""
    if runtime == ONNXRUNTIME:
        return OnnxRuntimeForward(model, device, threads=threads)
    if runtime == OPENVINO:
        # Imported here: openvino (60 MB of native libraries) loads only when it is chosen.
        from bitcore.runtime_openvino import OpenVinoForward

        return OpenVinoForward(model, device, threads=threads)
    raise ValueError(
        f"{runtime!r} does not run an exported graph; expected one of {GRAPH_RUNTIMES}"
    )


class OnnxRuntimeForward:
    """An InferenceSession on an exported graph: preprocessed (N, 3, H, W) -> logits (N, C).

    `model` is the .onnx file's path or its bytes. One session serves every batch size (the
    batch axis is dynamic). Not to be called from several threads at once for speed: the
    Predictor serialises forwards, and the session itself spreads one over all threads.
    """

    def __init__(
        self, model: str | Path | bytes, device: torch.device, *, threads: int | None = None
    ) -> None:
        import onnxruntime as ort  # optional at import time: only this runtime needs it

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or available_cpus()
        options.inter_op_num_threads = 1  # a chain of convolutions: nothing to run beside it
        # ORT's logging goes to stderr by default; errors only (warnings are about node
        # placement on the CPU provider, expected for shape ops).
        options.log_severity_level = 3
        # No busy-waiting between runs: ORT's idle pool threads otherwise spin on the cores
        # and starve what runs next there (image decoding, another model's eager forward;
        # measured: eager beside a spinning session ran up to 50x slower on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = _providers(device, ort.get_available_providers())
        source = str(model) if isinstance(model, Path) else model
        self.session = ort.InferenceSession(source, options, providers=self.providers)
        self.input_name = self.session.get_inputs()[0].name
        self.threads = options.intra_op_num_threads

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        (logits,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))


def _providers(device: torch.device, available: list[str]) -> list[str]:
    if device.type == "cuda":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.warning(
            "device is %s but this onnxruntime has no CUDA execution provider: running on "
            "the CPU (install onnxruntime-gpu, or BITSERVE_PREDICT_RUNTIME=torch)",
            device,
        )
    return ["CPUExecutionProvider"]


def check_inputs(crop: int, count: int = CHECK_IMAGES) -> torch.Tensor:
    """Fixed inputs for the load check: seeded uniform noise in [-1, 1], (count, 3, crop,
    crop). More than one image, so the dynamic batch axis is exercised too."""
    generator = torch.Generator().manual_seed(CHECK_SEED)
    return torch.rand((count, 3, crop, crop), generator=generator).mul_(2).sub_(1)


def check_against_eager(
    eager: nn.Module,
    forward: Forward,
    crop: int,
    *,
    runtime: str = ONNXRUNTIME,
    tolerance: float = CHECK_TOLERANCE,
) -> float:
    """The largest |probability difference| between `forward` and `eager` on the fixed
    inputs; raises RuntimeMismatch above `tolerance`. `eager` runs in float32 on the CPU
    semantics of its own device (no autocast): the reference is the exact model."""
    inputs = check_inputs(crop)
    device = next(eager.parameters()).device
    with torch.inference_mode():
        reference = eager(inputs.to(device)).float().softmax(dim=1).cpu()
    candidate = forward(inputs).float().softmax(dim=1)
    if candidate.shape != reference.shape:
        raise RuntimeMismatch(runtime, float("inf"), tolerance)
    max_diff = float((candidate - reference).abs().max())
    if not max_diff <= tolerance:  # NaN fails too
        raise RuntimeMismatch(runtime, max_diff, tolerance)
    return max_diff
