"""The "openvino" predict runtime: the exported ONNX graph compiled by OpenVINO for the CPU.

OpenVINO reads the .onnx file (bitcore.export) directly, no conversion step, and compiles it
for its "CPU" plugin with the batch axis left dynamic. The compile properties, and why:
- INFERENCE_PRECISION_HINT f32: on CPUs with bf16 (AMX, AVX512-BF16) OpenVINO would otherwise
  run in bf16 by itself; the served probabilities must be the float32 model's (the load check
  of bitcore.runtimes compares them with eager at 1e-3, and bf16 rounding is of that order).
- PERFORMANCE_HINT LATENCY, NUM_STREAMS 1: one inference at a time over all threads, which is
  how the Predictor calls it (forwards are serialised; the service batches requests instead).
- INFERENCE_NUM_THREADS = the CPUs this process may use (its affinity mask), as for ONNX
  Runtime: more threads than cores only contend.
- ENABLE_CPU_PINNING false: pinned threads cannot move off a core that the gateway's image
  decoding or another process needs right then; on a few shared cores the kernel's scheduler
  must stay free to move them (OpenVINO pins by default on Linux).
OpenVINO has no switch for busy-waiting (ONNX Runtime's allow_spinning): its TBB worker
threads spin only briefly after an inference and then sleep. Measured after an R50x1 forward
on 2 cores, process CPU time during an idle gap of 20 / 500 ms: OpenVINO 1.2 / 0.8 ms, ONNX
Runtime with spinning 8.5 / 70 ms, without 0.1 / 0.1 ms. So idle it leaves the cores to the
gateway's image decoding, nearly as well as bitserve's ONNX Runtime session (spinning off).

There is no CUDA device in OpenVINO (its "GPU" plugin is for Intel GPUs): with a CUDA
predictor device the graph still runs on the CPU, with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch

from bitcore.data.index import available_cpus

log = logging.getLogger(__name__)

DEVICE = "CPU"


def compile_config(threads: int) -> dict[str, Any]:
    """The CPU plugin's compile properties (the module docstring says why each)."""
    return {
        "INFERENCE_PRECISION_HINT": ov.Type.f32,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": threads,
        "ENABLE_CPU_PINNING": False,
    }


class OpenVinoForward:
    """A compiled model on an exported graph: preprocessed (N, 3, H, W) -> logits (N, C).

    `model` is the .onnx file's path or its bytes. One compiled model and one infer request
    serve every batch size (the batch axis is dynamic). Not to be called from several threads
    at once: an infer request runs one inference at a time, and the Predictor serialises
    forwards anyway. `infer` releases the GIL, as ONNX Runtime's run does (measured: a Python
    thread beside R50x1 batch-8 forwards woke every 1 ms, its longest gap 6 ms with either), so
    the gateway's event loop and decode threads keep running during a forward.
    """

    def __init__(
        self, model: str | Path | bytes, device: torch.device, *, threads: int | None = None
    ) -> None:
        if device.type != "cpu":
            log.warning(
                "device is %s but OpenVINO runs on the CPU here (it has no CUDA device): use "
                "BITSERVE_PREDICT_RUNTIME=onnxruntime (with onnxruntime-gpu) or torch",
                device,
            )
        self.threads = threads or available_cpus()
        core = ov.Core()
        # read_model takes a path, or the bytes of an ONNX file as they are.
        source = str(model) if isinstance(model, Path) else model
        self.compiled = core.compile_model(
            core.read_model(source), DEVICE, compile_config(self.threads)
        )
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)

    def property(self, name: str) -> Any:
        """A property of the compiled model as OpenVINO applied it (e.g. NUM_STREAMS)."""
        return self.compiled.get_property(name)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        # share_outputs=False (the default): the result is a copy, not the request's buffer,
        # which the next inference overwrites.
        result = self.request.infer({0: array})
        return torch.from_numpy(np.asarray(result[self.output], dtype=np.float32))
