"""MixUp (Zhang et al., 2018) as BiT uses it: only for datasets of >= 20k examples (alpha 0.1).

Lambda and partners come from `order` (keyed by seed and step); partners are loaded with their
items by `batching.TrainBatches`.

Reference bit_pytorch/train.py: one lambda per optimizer step, partner = a random permutation of
the batch, input = lam * x + (1 - lam) * x[perm], loss = lam * CE(y) + (1 - lam) * CE(y[perm]).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def mix(x: torch.Tensor, x_partner: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * x + (1.0 - lam) * x_partner


def mixup_loss(
    logits: torch.Tensor, y: torch.Tensor, y_partner: torch.Tensor, lam: float
) -> torch.Tensor:
    return lam * F.cross_entropy(logits, y) + (1.0 - lam) * F.cross_entropy(logits, y_partner)
