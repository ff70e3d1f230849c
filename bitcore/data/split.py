"""Seeded, stratified train/validation split.

BiT's small-data results (1-, 5-, 10-shot, VTAB-1k) hold the class balance fixed; a stratified
split keeps every class in both halves so validation accuracy and per-class metrics exist for
each class even on tiny uploads.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from bitcore.data.index import Sample


def stratified_split(
    samples: Sequence[Sample], validation_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """(train, validation): per class round(n * fraction) to validation (half rounds up).

    Every class with >= 2 images keeps at least one image in each half (unless the fraction is
    0: then validation is empty). A class with one image stays in train. The choice depends only
    on (seed, class label, the class's paths), not on the order of `samples`; both halves keep
    the input order.
    """
    if not 0.0 <= validation_fraction < 1.0 or math.isnan(validation_fraction):
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_label[sample.label].append(sample)

    validation: set[Sample] = set()
    for label, members in by_label.items():
        count = len(members)
        k = validation_count(count, validation_fraction)
        ordered = sorted(members, key=lambda s: s.path)
        rng = np.random.default_rng([seed, label])
        chosen = rng.permutation(count)[:k]
        validation.update(ordered[i] for i in chosen)

    train = [s for s in samples if s not in validation]
    val = [s for s in samples if s in validation]
    return train, val


def validation_count(class_size: int, validation_fraction: float) -> int:
    """How many of a class's images go to validation: round(n * fraction), half up, keeping at
    least one image on each side when the class has two or more (one image stays in train).
    The service sizes the HyperRule's schedule from the training count this leaves."""
    k = math.floor(class_size * validation_fraction + 0.5)
    if validation_fraction > 0 and class_size >= 2:
        return min(max(k, 1), class_size - 1)
    return k if class_size >= 2 else 0
