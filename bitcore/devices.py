"""Accelerator selection: CUDA, then Apple MPS, then XLA (TPU via torch_xla), then CPU."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable

import torch

ENV_VAR = "BITSERVE_DEVICE"


def select_device(preferred: str | None = None) -> torch.device:
    """`preferred` (or $BITSERVE_DEVICE) wins when given ("cpu", "cuda:1", "mps", "xla", "xla:1")."""
    choice = preferred or os.environ.get(ENV_VAR) or "auto"
    if choice != "auto":
        xla = re.fullmatch(r"xla(?::(\d+))?", choice)
        if xla:
            return _xla_device(int(xla.group(1)) if xla.group(1) else None)
        try:
            device = torch.device(choice)
        except RuntimeError as exc:
            # Name where the bad value came from: a typo in the environment is the usual cause.
            source = "argument" if preferred else f"${ENV_VAR}"
            raise RuntimeError(
                f"unknown device {choice!r} (from {source}): use auto, cpu, cuda[:N], mps or"
                " xla[:N]"
            ) from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {choice!r} requested but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"device {choice!r} requested but Apple MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    if importlib.util.find_spec("torch_xla") is not None:
        return _xla_device(None)
    return torch.device("cpu")


# What a TPU VM needs (docs/deployment.md, "TPU"): the torch_xla wheel matching torch's version.
XLA_INSTALL_HINT = (
    "install torch_xla for torch {torch} on the TPU VM: pip install 'torch_xla[tpu]=={torch}'"
    " (https://github.com/pytorch/xla)"
)


def _xla_device(index: int | None) -> torch.device:
    """The XLA device (a TPU core via torch_xla), imported only when asked for: torch_xla is
    not a dependency (it exists for TPU VMs only)."""
    name = "xla" if index is None else f"xla:{index}"
    try:
        import torch_xla.core.xla_model as xm  # type: ignore[import-not-found]
    except ImportError as exc:
        torch_version = torch.__version__.split("+")[0]
        raise RuntimeError(
            f"device {name!r} requested but torch_xla is not installed: "
            + XLA_INSTALL_HINT.format(torch=torch_version)
        ) from exc
    # xla_device(n) is the n-th device of this process's host; None lets torch_xla choose.
    return xm.xla_device(index) if index is not None else xm.xla_device()  # type: ignore[no-any-return]


def uses_bf16_autocast(device: torch.device) -> bool:
    """bf16 autocast on CUDA GPUs that support it (Ampere+) and on XLA (every TPU has bf16
    matrix units; torch.autocast("xla") is torch_xla's); fp32 elsewhere."""
    if device.type == "xla":
        return True
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def step_marker(device: torch.device) -> Callable[[], None] | None:
    """What ends a training step on `device`: on XLA, torch_xla's `mark_step()`, which cuts the
    lazily traced graph and runs it (without it every step appends to one ever-growing graph);
    None elsewhere (CUDA, MPS and CPU run each operation eagerly).

    torch_xla is imported here, only for an XLA device (which only torch_xla can have made)."""
    if device.type != "xla":
        return None
    import torch_xla.core.xla_model as xm  # type: ignore[import-not-found]

    return xm.mark_step  # type: ignore[no-any-return]


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`batch` on `device`, for inference and evaluation inputs.

    CPU -> CUDA goes through page-locked (pinned) memory with non_blocking=True: the DMA engine
    reads pinned pages directly, while a pageable tensor is first copied by the driver into a
    staging buffer with the calling thread blocked. The copy is queued on the current stream,
    so the forward that follows on the same stream sees the data; reading the result back
    (`.cpu()`) synchronises. pin_memory() copies into torch's caching host allocator (pinned
    blocks are reused, not allocated per call); an already pinned tensor is not copied again.

    Elsewhere (CPU, MPS, XLA) a plain `.to(device)`: a tensor already there is returned as is.
    """
    if device.type == "cuda" and batch.device.type == "cpu":
        pinned = batch if batch.is_pinned() else batch.pin_memory()
        return pinned.to(device, non_blocking=True)
    return batch.to(device)


def uploads_pinned(device: torch.device) -> bool:
    """Whether `to_device` pins CPU batches bound for `device` (for reports and checks)."""
    return device.type == "cuda"
