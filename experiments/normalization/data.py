"""scikit-learn's handwritten digits (1,797 real 8x8 scans), as small RGB images in [-1, 1].

A real image dataset that ships inside a package, so the experiment needs no download. The 8x8
grey images are upscaled (bilinear) to 32x32 and copied to three channels so the unchanged BiT
ResNetV2 (RGB input in [-1, 1], docs/bit.md "Input") can read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional as F

IMAGE_SIZE = 32
TEST_FRACTION = 1 / 3
SPLIT_SEED = 0  # one fixed train/test split; seeds vary the model and the data order only


@dataclass(frozen=True)
class Split:
    """Images (N, 3, H, W) in [-1, 1] and integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, mask: torch.Tensor) -> Split:
        return Split(self.images[mask], self.labels[mask])


def to_images(pixels: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, 8, 8) digits values 0..16 -> (N, 3, size, size) float32 in [-1, 1]."""
    x = torch.from_numpy(pixels.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0.0, 1.0) * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()


def load(size: int = IMAGE_SIZE) -> tuple[Split, Split]:
    """The stratified train / test split (1,198 / 599 images)."""
    digits = load_digits()
    train_idx, test_idx = train_test_split(
        np.arange(len(digits.target)),
        test_size=TEST_FRACTION,
        random_state=SPLIT_SEED,
        stratify=digits.target,
    )
    images = to_images(digits.images, size)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return (
        Split(images[train_idx], labels[train_idx]),
        Split(images[test_idx], labels[test_idx]),
    )


def classes(split: Split, keep: tuple[int, ...], *, per_class: int | None = None) -> Split:
    """Only the classes in `keep`, relabelled 0..len(keep)-1; optionally the first `per_class`."""
    chosen: list[int] = []
    for old_label in keep:
        idx = torch.nonzero(split.labels == old_label).flatten().tolist()
        chosen.extend(idx[:per_class] if per_class is not None else idx)
    index = torch.tensor(sorted(chosen), dtype=torch.long)
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[torch.tensor(keep)] = torch.arange(len(keep))
    return Split(split.images[index], relabel[split.labels[index]])
