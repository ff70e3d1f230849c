"""Micro-batch fetching for the training DataLoader: keys in, batched tensors out.

The DataLoader asks for a whole micro-batch at once (`__getitems__`), so the conversion of
uint8 crops to float happens once per batch instead of once per image. For the image cache's
train dataset the uint8 crops come from `CachedImageDataset.train_window`, which its per-item
path uses too, so the tensors are bit-identical to its per-item output; profiling on 2 CPU
cores showed the per-image float conversion costing as much as the crop itself. Any other
keyed dataset is fetched per item.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from bitcore.data.datasets import CachedImageDataset
from bitcore.train.order import Key


class TrainBatches(Dataset):
    """`__getitems__(keys)` -> [x, y] or, with MixUp pairs (own, partner) -> [x, y, xp, yp].

    With MixUp the partner of each item is loaded with it (a second cheap read from the cache)
    rather than permuted within the micro-batch, so the mix is lam * x + (1 - lam) * x[perm]
    over the whole batch, independent of the micro-batch size and the number of DDP ranks.
    """

    def __init__(self, dataset: Any, *, mixup: bool = False) -> None:
        self.dataset = dataset
        self.mixup = mixup

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> list[torch.Tensor]:
        return self.__getitems__([key])

    def __getitems__(self, keys: Sequence[Any]) -> list[torch.Tensor]:
        if self.mixup:
            own = fetch(self.dataset, [k[0] for k in keys])
            partner = fetch(self.dataset, [k[1] for k in keys])
            return [*own, *partner]
        return list(fetch(self.dataset, keys))


def fetch(dataset: Any, keys: Sequence[Key]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x: float N x 3 x crop x crop in [-1, 1], y: long N) for train keys (index, aug_seed)."""
    if isinstance(dataset, CachedImageDataset) and dataset.train:
        return _cached_crops(dataset, keys)
    items = [dataset[k] for k in keys]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def _cached_crops(
    dataset: CachedImageDataset, keys: Sequence[Key]
) -> tuple[torch.Tensor, torch.Tensor]:
    windows, labels = [], []
    for index, aug_seed in keys:
        window, label = dataset.train_window(index, aug_seed)
        windows.append(window)
        labels.append(label)
    x = torch.stack(windows).float().div_(127.5).sub_(1.0)  # = transforms.to_unit_range
    return x, torch.tensor(labels)


def already_batched(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    """collate_fn for `TrainBatches`: its `__getitems__` returns finished batches."""
    return batch
