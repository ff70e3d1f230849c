"""What a fine-tuning run starts from: the data splits and caches, and the initial model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bitcore.data import (
    CachedImageDataset,
    DatasetIndex,
    Sample,
    build_cache,
    index_directory,
    stratified_split,
)
from bitcore.hyperrule import Plan
from bitcore.models import MODEL_SPECS, ResNetV2, create_model, get_spec


class MissingCheckpointError(FileNotFoundError):
    """No pre-trained weights for the base model; the message says where to put them."""


@dataclass
class PreparedData:
    index: DatasetIndex
    train_samples: list[Sample]
    val_samples: list[Sample]
    train_set: CachedImageDataset  # keyed by (index, aug_seed), crops of the precrop cache
    val_set: CachedImageDataset  # keyed by int, resized to the crop

    def facts(self) -> dict[str, object]:
        return {
            "num_images": self.index.num_images,
            "num_train": len(self.train_samples),
            "num_validation": len(self.val_samples),
            "classes": self.index.counts(),
            "median_size": list(self.index.median_size),
            "rejected": len(self.index.rejected),
        }


def prepare_data(
    dataset: DatasetIndex | str | Path,
    plan: Plan,
    cache_dir: Path,
    *,
    validation_fraction: float,
    seed: int,
    shared_cache: bool = False,
) -> PreparedData:
    """Index (if given a folder), split by class, cache train at precrop and val at crop.

    A private cache holds just this run's split; a `shared_cache` (one directory per dataset,
    used by many jobs) holds every image at each size, so any seed's split finds it complete.
    """
    index = dataset if isinstance(dataset, DatasetIndex) else index_directory(dataset)
    train, val = stratified_split(index.samples, validation_fraction, seed)
    if not train:
        raise ValueError("the training split is empty: lower validation_fraction or add images")
    train_dir, val_dir = (
        (cache_dir, cache_dir) if shared_cache else (cache_dir / "train", cache_dir / "val")
    )
    train_cache = build_cache(
        index, plan.precrop, train_dir, samples=None if shared_cache else train
    )
    train_set = CachedImageDataset(train_cache, train, plan.crop, train=True)
    val_cache = build_cache(index, plan.crop, val_dir, samples=None if shared_cache else val)
    val_set = CachedImageDataset(val_cache, val, plan.crop, train=False)
    return PreparedData(index, train, val, train_set, val_set)


def resolve_checkpoint(
    base_model: str, checkpoint: str | Path | None, from_scratch: bool
) -> Path | None:
    """The .npz to start from (None: from scratch). Checked before any data work is done."""
    spec = get_spec(architecture_of(base_model))
    if from_scratch:
        if checkpoint is not None:
            raise ValueError("pass either checkpoint= or from_scratch=True, not both")
        return None
    path = Path(checkpoint) if checkpoint is not None else _catalog_path(base_model, spec.published)
    if not path.is_file():
        raise MissingCheckpointError(
            f"pre-trained weights for {base_model} not found at {path}; place the official .npz "
            "file there, or pass from_scratch=True to train without pre-training"
        )
    return path


def initial_model(
    base_model: str, num_classes: int, plan: Plan, checkpoint: Path | None, *, seed: int
) -> ResNetV2:
    """The registry model with pre-trained weights and a zero head (BiT transfer, paper sec.
    3.3), or randomly initialised (seeded, so every attempt starts alike) without a checkpoint."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(architecture_of(base_model), num_classes, zero_head=plan.zero_head)
    if checkpoint is not None:
        from bitcore.checkpoints import load_bit_npz  # only needed for transfer

        load_bit_npz(model, checkpoint, head="zero" if plan.zero_head else "keep")
    return model


def architecture_of(base_model: str) -> str:
    """The registry architecture of a base model: itself, or a catalog entry's architecture
    (e.g. "BiT-M-R50x1-ILSVRC2012" -> "BiT-M-R50x1"). Unknown names fail with the known list."""
    if base_model in MODEL_SPECS:
        return base_model
    from bitcore import catalog

    if base_model in catalog.CATALOG:
        return catalog.CATALOG[base_model].model_name
    return get_spec(base_model).name  # raises ValueError listing the known models


def _catalog_path(base_model: str, published: bool) -> Path:
    if not published:
        raise MissingCheckpointError(
            f"{base_model} is not a published BiT model and has no pre-trained checkpoint; "
            "pass from_scratch=True to train it from random initialisation"
        )
    from bitcore import catalog

    path = catalog.local_path(base_model)
    if not path.is_file():
        entry = catalog.get_entry(base_model)
        raise catalog.CheckpointMissing(
            base_model,
            path,
            entry.url(),
            "not downloaded yet (python -m bitcore checkpoints pull "
            f"{base_model}); or pass from_scratch=True to train without pre-training",
        )
    return catalog.verify_present(base_model, path)  # its SHA-256, as on every use
