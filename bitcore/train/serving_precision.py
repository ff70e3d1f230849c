"""The fine-tune's last step when a job asks for int8 serving (bitcore.quantize): calibrate
on training images, measure agreement on the validation split, keep int8 only if it passes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from bitcore.data.datasets import CachedImageDataset
from bitcore.export import export_onnx_bytes, serving_form
from bitcore.quantize import CALIBRATION_IMAGES, int8_guard
from bitcore.train.prepare import PreparedData

BATCH = 32


def calibration_samples(samples: Sequence[Any], count: int = CALIBRATION_IMAGES) -> list[Any]:
    """At most `count` training samples, evenly spaced: the split is ordered by class, so
    every class is represented, and the choice is the same on every run."""
    if len(samples) <= count:
        return list(samples)
    step = len(samples) / count
    return [samples[int(i * step)] for i in range(count)]


def int8_precision(
    model: torch.nn.Module, data: PreparedData, crop: int, out_dir: Path, *, model_name: str
) -> dict[str, Any]:
    """Run the int8 guard for the trained `model`; its PrecisionCheck as a dict."""
    reference = serving_form(model)  # a folded, eval-mode CPU copy: the float32 served model
    exported = export_onnx_bytes(
        reference, crop=crop, classes=list(data.index.classes), model_name=model_name
    )
    calibration = CachedImageDataset(
        data.train_set.cache, calibration_samples(data.train_samples), crop, train=False
    )
    check = int8_guard(
        reference,
        exported,
        _images(calibration),
        _images(data.val_set),
        crop=crop,
        out_dir=out_dir,
    )
    return check.to_dict()


def _images(dataset: CachedImageDataset) -> Iterator[torch.Tensor]:
    for images, _labels in DataLoader(dataset, batch_size=BATCH, num_workers=0):
        yield images
