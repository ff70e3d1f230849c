"""Accelerator selection: CUDA, then Apple MPS, then XLA (TPU via torch_xla), then CPU."""

from __future__ import annotations

import importlib.util
import os

import torch

ENV_VAR = "BITSERVE_DEVICE"


def select_device(preferred: str | None = None) -> torch.device:
    """`preferred` (or $BITSERVE_DEVICE) wins when given ("cpu", "cuda:1", "mps", "xla")."""
    choice = preferred or os.environ.get(ENV_VAR) or "auto"
    if choice != "auto":
        if choice == "xla":
            return _xla_device()
        try:
            device = torch.device(choice)
        except RuntimeError as exc:
            # Name where the bad value came from: a typo in the environment is the usual cause.
            source = "argument" if preferred else f"${ENV_VAR}"
            raise RuntimeError(
                f"unknown device {choice!r} (from {source}): use auto, cpu, cuda[:N], mps or xla"
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
        return _xla_device()
    return torch.device("cpu")


def _xla_device() -> torch.device:
    try:
        import torch_xla.core.xla_model as xm  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError("device 'xla' requested but torch_xla is not installed") from exc
    return xm.xla_device()  # type: ignore[no-any-return]


def uses_bf16_autocast(device: torch.device) -> bool:
    """bf16 autocast on CUDA GPUs that support it (Ampere+); fp32 elsewhere."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()
