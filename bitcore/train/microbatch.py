"""Choosing the micro-batch: BiT's batch 512 rarely fits one device, so the engine accumulates
gradients over micro-batches (docs/bit.md; reference train.py `--batch_split`)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

CPU_MICRO_BATCH = 32  # CPU throughput stops improving well before this; memory is not the limit
CUDA_HEADROOM = 0.9  # leave room for fragmentation and the DataLoader's pinned buffers


def power_of_two_divisors(batch: int, cap: int | None = None) -> list[int]:
    """Power-of-two divisors of `batch`, largest first, at most `cap`."""
    out, d = [], 1
    while batch % d == 0 and d <= batch:
        if cap is None or d <= cap:
            out.append(d)
        d *= 2
    return sorted(out, reverse=True)


def choose_micro_batch_size(
    model: torch.nn.Module,
    batch_size: int,
    crop: int,
    device: torch.device,
    *,
    world_size: int = 1,
    autocast: bool = False,
    channels_last: bool = False,
) -> int:
    """The global micro-batch (all ranks together) for `batch_size`.

    Each rank holds batch_size / world_size images per step; its share of a micro-batch is the
    largest power-of-two divisor of that which fits: on CUDA found by trying a forward/backward
    pass at `crop` px, on CPU capped at CPU_MICRO_BATCH.
    """
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
    local_batch = batch_size // world_size
    if device.type != "cuda":
        return power_of_two_divisors(local_batch, CPU_MICRO_BATCH)[0] * world_size
    momentum_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for local in power_of_two_divisors(local_batch):
        if _fits_cuda(model, local, crop, device, momentum_bytes, autocast, channels_last):
            return local * world_size
    raise RuntimeError(f"even a micro-batch of 1 image at {crop} px does not fit on {device}")


def _fits_cuda(
    model: torch.nn.Module,
    micro: int,
    crop: int,
    device: torch.device,
    reserve_bytes: int,
    autocast: bool,
    channels_last: bool,
) -> bool:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.randn(micro, 3, crop, crop, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), torch.zeros(micro, dtype=torch.long, device=device))
        loss.backward()
        peak = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        return peak + reserve_bytes <= CUDA_HEADROOM * total
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        del x
        torch.cuda.empty_cache()
