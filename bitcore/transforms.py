"""Image -> tensor transforms (Pillow + torch; no torchvision).

BiT's input convention is RGB in [-1, 1]: (x/255 - 0.5) / 0.5. Train: resize (squash, no
aspect keep) -> random crop -> random horizontal flip; eval: resize straight to the crop size
(bit_pytorch/train.py).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

RESAMPLE = Image.Resampling.BILINEAR


def resize_squash(image: Image.Image, size: int) -> Image.Image:
    """Resize to size x size ignoring the aspect ratio, as the reference transforms do."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), RESAMPLE)


def to_unit_range(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 HWC (or NHWC) -> float32 CHW (NCHW) in [-1, 1]."""
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        # np.asarray(PIL image) is read-only; torch warns on wrapping it. The copy is tiny.
        array = array.copy()
    tensor = torch.as_tensor(array)
    if tensor.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {tensor.dtype}")
    tensor = tensor.movedim(-1, -3).float()
    return tensor.div_(127.5).sub_(1.0)


def eval_preprocess(image: Image.Image, crop: int) -> torch.Tensor:
    """An RGB PIL image -> (3, crop, crop) float tensor in [-1, 1]."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() always copies
    resized = resize_squash(rgb, crop)
    return to_unit_range(np.asarray(resized, dtype=np.uint8))


def random_crop_flip(pixels: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop x crop window and a coin-flip horizontal mirror of a (..., C, H, W) tensor."""
    height, width = pixels.shape[-2:]
    if crop > height or crop > width:
        raise ValueError(f"crop {crop} larger than image {height}x{width}")
    top = int(torch.randint(0, height - crop + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - crop + 1, (1,), generator=generator))
    out = pixels[..., top : top + crop, left : left + crop]
    if bool(torch.rand((), generator=generator) < 0.5):
        out = out.flip(-1)
    return out
