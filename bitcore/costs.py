"""What a fine-tuning plan will cost before it runs: memory, cache bytes, images processed.

Estimates, not measurements, but of the right size: the activation memory is what autograd
saves for the backward pass of the registry model itself, counted on the meta device (shapes
only: no memory, no compute), so it follows each model's depth and width without a
hand-tuned factor. A service compares these figures with its limits before it accepts a job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import torch

from bitcore.hyperrule import Plan
from bitcore.models import count_parameters, create_model

# Two input sizes: the saved bytes grow linearly with the pixel count; the difference between
# them is the per-pixel part (what does not grow, e.g. weights saved for the backward pass,
# drops out).
_PROBE_CROPS = (64, 128)
FLOAT_BYTES = 4
# Weights, their gradients and SGD momentum, all float32.
STATE_COPIES = 3
CACHE_CHANNELS = 3  # the decode-once cache stores uint8 RGB (bitcore.data.cache)
# Each cached image takes at most min(its file's bytes, precrop^2 x 3) (bitcore.data.cache),
# so the cache is at most the dataset's files. What a caller knows is the uploaded archive's
# bytes: JPEG, PNG, WebP and GIF barely deflate (the archive is about the files), BMP does;
# this factor covers a BMP archive deflated to half and the index/manifest (~50 B an image).
CACHE_DATASET_FACTOR = 2


@dataclass(frozen=True)
class TrainingCost:
    """The estimate of one plan on one dataset."""

    memory_bytes: int  # model state + saved activations of one micro-batch
    micro_batch_size: int  # the micro-batch the memory figure is for
    cache_bytes: int  # the cache at precrop: min(images x precrop^2 x 3, 2 x dataset bytes)
    images_processed: int  # total_steps x batch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@cache
def activation_bytes_per_pixel(model: str) -> float:
    """Bytes autograd saves per input pixel of one image (a registry model, float32)."""
    saved = [_saved_bytes(model, crop) for crop in _PROBE_CROPS]
    pixels = [crop * crop for crop in _PROBE_CROPS]
    return (saved[1] - saved[0]) / (pixels[1] - pixels[0])


def _saved_bytes(model: str, crop: int) -> int:
    with torch.device("meta"):
        net = create_model(model, num_classes=2)
        image = torch.zeros(1, 3, crop, crop)
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        net(image)
    return total


def estimate(
    model: str, plan: Plan, num_images: int, dataset_bytes: int | None = None
) -> TrainingCost:
    """The cost of training `model` with `plan` on a dataset of `num_images` images.

    With no micro-batch in the plan the trainer picks one that fits at run time: the least it
    can pick is one image, so that is what must fit. `dataset_bytes` (the uploaded archive's
    size), when known, bounds the cache as well: see `cache_estimate`.
    """
    micro = plan.micro_batch_size or 1
    state = count_parameters(model) * FLOAT_BYTES * STATE_COPIES
    activations = activation_bytes_per_pixel(model) * plan.crop * plan.crop * micro
    return TrainingCost(
        memory_bytes=int(state + activations),
        micro_batch_size=micro,
        cache_bytes=cache_estimate(num_images, plan.precrop, dataset_bytes),
        images_processed=plan.total_steps * plan.batch_size,
    )


def pixels_bytes(num_images: int, size: int) -> int:
    """Every image squashed to size x size x 3: what a cache at `size` holds at most."""
    return num_images * size * size * CACHE_CHANNELS


def cache_estimate(num_images: int, precrop: int, dataset_bytes: int | None = None) -> int:
    """The bytes of the image cache at `precrop`: at most every image's pixels at that size,
    and at most about the dataset's own bytes (CACHE_DATASET_FACTOR x `dataset_bytes`)."""
    pixels = pixels_bytes(num_images, precrop)
    if dataset_bytes is None:
        return pixels
    return min(pixels, CACHE_DATASET_FACTOR * dataset_bytes)


__all__ = [
    "TrainingCost",
    "activation_bytes_per_pixel",
    "cache_estimate",
    "estimate",
    "pixels_bytes",
]
