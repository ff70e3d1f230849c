"""Validation metrics with plain torch: accuracy, per-class precision/recall/F1, confusion."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.nn import functional as F

from bitcore.devices import to_device


def confusion_matrix(
    labels: torch.Tensor, predictions: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """counts[true, predicted]."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, -1)


def classification_metrics(
    labels: torch.Tensor | Sequence[int],
    predictions: torch.Tensor | Sequence[int],
    classes: Sequence[str],
) -> dict[str, Any]:
    """The docs/api.md shape: {accuracy, per_class:[{label, precision, recall, f1, support}],
    confusion_matrix, num_examples, macro_f1}. A ratio with a zero denominator is 0.0
    (as scikit-learn's zero_division=0)."""
    y = torch.as_tensor(labels, dtype=torch.long)
    p = torch.as_tensor(predictions, dtype=torch.long)
    if y.shape != p.shape:
        raise ValueError(f"labels {tuple(y.shape)} and predictions {tuple(p.shape)} differ")
    k = len(classes)
    counts = confusion_matrix(y, p, k).double()
    tp = counts.diagonal()
    support = counts.sum(1)
    predicted = counts.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), 0.0)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), 0.0)
    total = int(support.sum())
    per_class = [
        {
            "label": str(classes[i]),
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i in range(k)
    ]
    return {
        "accuracy": float(tp.sum() / total) if total else None,
        "macro_f1": float(f1.mean()) if k else None,
        "num_examples": total,
        "per_class": per_class,
        "confusion_matrix": counts.long().tolist(),
    }


@torch.no_grad()
def predict_batches(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    autocast: bool = False,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Run `model` in eval mode over (x, y) batches: (labels, predictions, mean CE loss)."""
    was_training = model.training
    model.eval()
    labels, preds = [], []
    loss_sum, n = 0.0, 0
    ctx: AbstractContextManager[Any] = (
        torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    )
    try:
        for x, y in batches:
            # Pinned, non-blocking uploads on CUDA (a DataLoader with pin_memory=True already
            # pins them: no second copy); NHWC is made on the device, after the copy.
            x = to_device(x, device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = to_device(y, device)
            with ctx:
                logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
            labels.append(y.cpu())
            preds.append(logits.argmax(1).cpu())
    finally:
        model.train(was_training)
    if not labels:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, float("nan")
    return torch.cat(labels), torch.cat(preds), loss_sum / n
