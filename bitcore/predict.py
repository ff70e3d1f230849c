"""Inference for a fine-tuned BiT model: load once, decode -> preprocess -> batched forward.

Weight Standardization (Qiao et al., 2019; BiT sec. 4.3) is a pure function of the weights, so
the kernels are standardised once at load (`bitcore.layers.fold_weight_standardization`) and
the forward pass runs plain convolutions (docs/operations.md quotes about 5x more images per second
at batch 1 for an R50x1 at 128 px on 2 CPU cores; benchmarks/RESULTS.md measures 3.5-3.75x with
2 threads, 1.55x at batch 8). GroupNorm uses per-image statistics, so a batch gives every
image exactly the answer it would get alone: the service may batch freely.

Decoding/preprocessing (`preprocess`) is separate from the forward pass (`predict_tensor`) so
the service can decode in a thread pool and send many requests' tensors through one forward.

The forward runs on a runtime (bitcore.runtimes): "torch" (eager), or "onnxruntime" or
"openvino" on the graph bitcore.export writes (cached as model.onnx in the artifact's folder).
A runtime other than eager is checked against eager at load and refused (RuntimeMismatch) if
they disagree.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from bitcore.artifacts import load_model
from bitcore.devices import select_device, to_device, uses_bf16_autocast
from bitcore.export import ExportError, ensure_onnx, export_onnx_bytes
from bitcore.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from bitcore.layers import fold_weight_standardization
from bitcore.quantize import FP32, INT8, load_int8, recorded_check
from bitcore.runtimes import (
    GRAPH_RUNTIMES,
    ONNXRUNTIME,
    TORCH,
    Forward,
    check_against_eager,
    graph_forward,
    validate_runtime,
)
from bitcore.transforms import eval_preprocess

log = logging.getLogger(__name__)
ImageInput = Image.Image | bytes | bytearray
Prediction = list[tuple[str, float]]
# Draft decoding keeps both sides >= this x crop: the antialiased resize still averages over
# 2x2+ decoded pixels per output pixel.
JPEG_DRAFT_FACTOR = 2


class InputImageError(ImageError):
    """One image of a request could not be used; `index` says which (docs/api.md: 422 names it)."""

    def __init__(self, index: int, reason: str, message: str) -> None:
        super().__init__(reason, f"image {index}: {message}")
        self.index = index


class Predictor:
    """A model ready to serve: eval mode, WS folded, on its device, with its class names.

    Thread safety: `preprocess` touches no shared state and may run in many threads at once.
    The forward pass is serialised by a lock: the model itself is read-only in eval mode, but
    concurrent forwards on one device only compete for the same cores (or GPU stream) and make
    every caller slower; the service batches requests instead of running them side by side.
    """

    def __init__(
        self,
        model: nn.Module,
        classes: Sequence[str],
        crop: int,
        device: torch.device,
        *,
        model_name: str,
        max_batch_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        onnx_model: str | Path | bytes | None = None,
        threads: int | None = None,
        jpeg_draft: bool = False,
        graph_runtime: str = ONNXRUNTIME,
    ) -> None:
        """Wrap an already prepared model; use `load` or `from_model` to build one.

        With `onnx_model` (a path or the bytes of its export) the forward runs on
        `graph_runtime` ("onnxruntime" or "openvino"), after a check against `model` (eager)
        that raises RuntimeMismatch if they disagree.
        `threads` is the graph runtime's intra-op thread count (default: bitcore.cpus's
        figure); eager uses torch's process-wide setting (torch.set_num_threads). `jpeg_draft`
        lets `preprocess` decode a JPEG at a reduced scale (see `preprocess`).
        """
        if not classes:
            raise ValueError("a predictor needs at least one class")
        if crop < 1:
            raise ValueError(f"crop must be >= 1, got {crop}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
        self.model = model
        self.classes: list[str] = [str(c) for c in classes]
        self.crop = int(crop)
        self.device = device
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.max_pixels = max_pixels
        self.jpeg_draft = jpeg_draft
        # bf16 autocast on Ampere+ GPUs; channels_last lets cuDNN pick NHWC convolution kernels.
        self.autocast = uses_bf16_autocast(device)
        self.channels_last = device.type == "cuda"
        self._lock = threading.Lock()
        self.runtime = TORCH
        self.runtime_max_diff: float | None = None  # the load check's figure (None: eager)
        self.precision = FP32  # INT8 once `load` switched to a guarded int8 graph
        self._onnx: Forward | None = None  # the graph runtime's forward (None: eager)
        if onnx_model is not None:
            onnx = graph_forward(graph_runtime, onnx_model, device, threads=threads)
            self.runtime_max_diff = check_against_eager(
                model, onnx, self.crop, runtime=graph_runtime
            )
            self._onnx, self.runtime = onnx, graph_runtime

    @classmethod
    def load(
        cls,
        artifact_dir: str | Path,
        device: str | torch.device | None = None,
        *,
        fold_ws: bool = True,
        max_batch_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        runtime: str = TORCH,
        int8: bool = True,
        threads: int | None = None,
        jpeg_draft: bool = False,
    ) -> Predictor:
        """Load a saved artifact (safetensors + metadata.json) for inference.

        runtime="onnxruntime" or "openvino" exports the model to the artifact's model.onnx
        first unless a current export is already there (bitcore.export.ensure_onnx). A model
        whose int8 guard passed (bitcore.quantize) is served by its int8 graph on ONNX
        Runtime, unless runtime="torch" or int8=False.
        """
        validate_runtime(runtime)
        target = select_device(str(device) if device is not None else None)
        model, meta = load_model(artifact_dir, device="cpu")
        prepared = _prepare(model, target, fold_ws=fold_ws)
        check = recorded_check(meta.metrics)
        use_int8 = int8 and runtime != TORCH and check is not None and check.served == INT8
        onnx_model = None
        if runtime in GRAPH_RUNTIMES and not use_int8:  # int8: its own graph replaces fp32's
            try:
                onnx_model = ensure_onnx(artifact_dir, model=prepared, meta=meta)
            except ExportError as exc:  # over ONNX's 2 GiB: still served, by eager
                log.warning("%s is served by PyTorch eager: %s", meta.model_name, exc)
        predictor = cls(
            prepared,
            meta.classes,
            meta.crop,
            target,
            model_name=meta.model_name,
            max_batch_size=max_batch_size,
            max_pixels=max_pixels,
            onnx_model=onnx_model,
            threads=threads,
            jpeg_draft=jpeg_draft,
            graph_runtime=runtime,  # used only with onnx_model
        )
        if use_int8 and check is not None:
            predictor._onnx, predictor.runtime_max_diff = load_int8(
                artifact_dir, check, prepared, target, meta.crop, threads=threads
            )
            predictor.runtime, predictor.precision = ONNXRUNTIME, INT8
        return predictor

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        classes: Sequence[str],
        crop: int,
        device: str | torch.device | None = "cpu",
        *,
        fold_ws: bool = True,
        model_name: str | None = None,
        max_batch_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        runtime: str = TORCH,
        threads: int | None = None,
        jpeg_draft: bool = False,
    ) -> Predictor:
        """A predictor for an in-memory model. The caller's model is copied, never modified.

        runtime="onnxruntime" or "openvino" exports it in memory (nothing is written)."""
        validate_runtime(runtime)
        num_outputs = getattr(model, "num_classes", None)
        if isinstance(num_outputs, int) and num_outputs != len(classes):
            raise ValueError(f"model has {num_outputs} outputs but {len(classes)} classes given")
        target = select_device(str(device) if device is not None else None)
        prepared = _prepare(copy.deepcopy(model), target, fold_ws=fold_ws)
        name = model_name or type(model).__name__
        onnx_model = None
        if runtime in GRAPH_RUNTIMES:
            onnx_model = export_onnx_bytes(prepared, crop=crop, classes=classes, model_name=name)
        return cls(
            prepared,
            classes,
            crop,
            target,
            model_name=name,
            max_batch_size=max_batch_size,
            max_pixels=max_pixels,
            onnx_model=onnx_model,
            threads=threads,
            jpeg_draft=jpeg_draft,
            graph_runtime=runtime,  # used only with onnx_model
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Decode (bytes) and resize to the crop: an (N, 3, crop, crop) CPU tensor in [-1, 1].

        Raises InputImageError (an ImageError) naming the first unusable image.
        With `jpeg_draft`, a JPEG is decoded at 1/2, 1/4 or 1/8 scale while both sides stay
        >= 2 x crop (libjpeg's DCT scaling: 2.1-3.4x faster for photos much larger than the crop),
        at the cost of slightly different pixels; off by default because scores move
        (benchmarks/RESULTS.md, "Image decoding (issue 13)").
        """
        min_size = JPEG_DRAFT_FACTOR * self.crop if self.jpeg_draft else None
        tensors = []
        for index, item in enumerate(images):
            if isinstance(item, bytes | bytearray):
                try:
                    image = decode_image(
                        bytes(item), max_pixels=self.max_pixels, jpeg_min_size=min_size
                    )
                except ImageError as exc:
                    raise InputImageError(index, exc.reason, str(exc)) from exc
            elif isinstance(item, Image.Image):
                image = item
            else:
                raise TypeError(f"image {index}: expected PIL.Image or bytes, got {type(item)}")
            tensors.append(eval_preprocess(image, self.crop))
        if not tensors:
            return torch.empty((0, 3, self.crop, self.crop))
        return torch.stack(tensors)

    def predict_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (N, num_classes), float32 on the CPU, for a preprocessed batch.

        Split into chunks of `max_batch_size` when one is set, to bound peak memory.
        """
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(batch.shape)}")
        if batch.shape[0] == 0:
            return torch.empty((0, self.num_classes))
        size = self.max_batch_size or batch.shape[0]
        chunks = [self._forward(chunk) for chunk in batch.split(size)]
        return torch.cat(chunks)

    def predict(self, images: Sequence[ImageInput], top_k: int = 5) -> list[Prediction]:
        """Per image, the top_k (label, probability) pairs, most probable first.

        top_k is clamped to the number of classes (docs/operations.md); ties keep class order.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be an int, got {top_k!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        return top_k_labels(self.predict_tensor(self.preprocess(images)), self.classes, top_k)

    def warmup(self, batch_size: int = 1) -> float:
        """One forward pass (allocator, kernel selection, lazy init); returns its seconds."""
        start = time.perf_counter()
        self.predict_tensor(torch.zeros((batch_size, 3, self.crop, self.crop)))
        return time.perf_counter() - start

    def _forward(self, chunk: torch.Tensor) -> torch.Tensor:
        if self._onnx is not None:
            with self._lock:
                probs = self._onnx(chunk).softmax(dim=1)
        else:
            probs = self._forward_eager(chunk)
        if probs.shape[1] != self.num_classes:
            raise RuntimeError(
                f"model gave {probs.shape[1]} outputs for {self.num_classes} classes"
            )
        return probs

    def _forward_eager(self, chunk: torch.Tensor) -> torch.Tensor:
        with self._lock, torch.inference_mode():
            # On CUDA: pinned, non-blocking upload; the .cpu() below synchronises.
            x = to_device(chunk, self.device)
            if self.channels_last:  # NHWC made on the device, after the copy
                x = x.contiguous(memory_format=torch.channels_last)
            autocast = (
                torch.autocast(self.device.type, dtype=torch.bfloat16)
                if self.autocast
                else contextlib.nullcontext()
            )
            with autocast:
                logits = self.model(x)
            # Softmax in float32 even under bf16 autocast: scores are reported to clients.
            return logits.float().softmax(dim=1).cpu()


def top_k_labels(probs: torch.Tensor, classes: Sequence[str], top_k: int) -> list[Prediction]:
    """Per row of `probs` (N, len(classes)), its top k (label, probability) pairs, descending.

    k is top_k clamped to [1, len(classes)]. The sort is stable, so tied probabilities keep
    class order and the answer does not change from run to run.
    """
    k = max(1, min(top_k, len(classes)))
    scores, indices = probs.sort(dim=1, descending=True, stable=True)
    return [
        [(classes[i], float(s)) for s, i in zip(row_s, row_i, strict=True)]
        for row_s, row_i in zip(scores[:, :k].tolist(), indices[:, :k].tolist(), strict=True)
    ]


def _prepare(model: nn.Module, device: torch.device, *, fold_ws: bool) -> nn.Module:
    """Eval mode, no gradients, WS folded (standardised once, in float32), on `device`."""
    model.eval()
    if fold_ws:
        # Fold before any move or cast, in the weights' own float32, so the standardised
        # kernels are as exact as the training-form forward pass would compute them.
        fold_weight_standardization(model)
    model.requires_grad_(False)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model
