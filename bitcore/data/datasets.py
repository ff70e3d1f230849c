"""torch Datasets over an ImageCache, with the BiT train/eval transforms.

Train (bit_pytorch/train.py): the cache loads images squashed to `precrop` (decoding and, for
images stored at their own size, squashing them here, in the DataLoader workers); then a
random `crop` window and a random horizontal flip, then [-1, 1]. Eval: resize to `crop` only.
Train keys are `(index, aug_seed)`: the sampler owns all randomness, so the augmentation of
every example is a pure function of the key, identical on resume and on every DDP rank, and
independent of how many DataLoader workers there are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bitcore.cpus import available_cpus
from bitcore.data.cache import ImageCache
from bitcore.data.index import Sample
from bitcore.transforms import random_crop_flip, resize_squash, to_unit_range

TrainKey = tuple[int, int]


class CachedImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """`train=True`: keys (index, aug_seed), a random crop x crop window of the cached precrop
    image, mirrored with probability 1/2. `train=False`: int keys, the cached image resized to
    crop x crop (a cache built at `crop` itself, as the engine does for validation, skips that
    second resize and matches the reference's single resize of the original exactly).
    """

    def __init__(
        self, cache: ImageCache, samples: Sequence[Sample], crop: int, *, train: bool
    ) -> None:
        if crop < 1:
            raise ValueError(f"crop must be >= 1, got {crop}")
        if train and crop > cache.size:
            raise ValueError(f"train crop {crop} is larger than the cached size {cache.size}")
        self.cache = cache
        self.samples = list(samples)
        self.crop = crop
        self.train = train
        for sample in self.samples:
            cache.row(sample)  # fail now, with the path, rather than inside a worker

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def __getitem__(self, key: int | TrainKey) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        if self.train:
            if not isinstance(key, tuple) or len(key) != 2:
                raise TypeError(f"a train dataset is indexed by (index, aug_seed), got {key!r}")
            window, label = self.train_window(*key)
            return to_unit_range(window.permute(1, 2, 0)), label
        if isinstance(key, tuple):
            raise TypeError(f"an eval dataset is indexed by int, got {key!r}")
        sample = self.samples[key]
        cached = self.cache.pixels(sample)
        if self.cache.size != self.crop:
            cached = np.asarray(resize_squash(Image.fromarray(cached), self.crop), dtype=np.uint8)
        return to_unit_range(cached), sample.label

    def train_window(self, index: int, aug_seed: int) -> tuple[torch.Tensor, int]:
        """The (3, crop, crop) uint8 training window of sample `index`, and its label.

        A pure function of the key: the generator is seeded by `aug_seed` alone.
        """
        sample = self.samples[index]
        pixels = torch.from_numpy(self.cache.pixels(sample))  # HWC uint8, a fresh array
        generator = torch.Generator().manual_seed(int(aug_seed))
        return random_crop_flip(pixels.permute(2, 0, 1), self.crop, generator), sample.label


def default_num_workers() -> int:
    """DataLoader worker processes: none on 1-2 CPUs, else one per spare CPU, at most 4.

    A cached item costs ~0.16 ms (crop, flip, [-1, 1] on a 160 px row, one thread), next to tens
    of ms of forward/backward per image on a CPU. Measured on 2 shared cores (tiny-R10x0.25,
    128 px, batch 32): 0, 1 and 2 workers all within noise (5-7 img/s, compute bound), so small
    machines keep loading in the main process and save the fork and the memory. With more
    cores, workers overlap loading with a GPU step.
    """
    cpus = available_cpus()
    return 0 if cpus <= 2 else min(4, cpus - 1)
