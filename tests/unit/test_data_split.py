"""bitcore.data.split.stratified_split: exact per-class counts, determinism, disjointness."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from bitcore.data import Sample, stratified_split


def _samples(counts: dict[int, int]) -> list[Sample]:
    return [
        Sample(f"c{label}/img_{i:03d}.png", label) for label, n in counts.items() for i in range(n)
    ]


@pytest.mark.parametrize(
    ("fraction", "expected_val"),
    [
        # class sizes 10, 5, 2, 1, 40
        (0.1, {0: 1, 1: 1, 2: 1, 4: 4}),  # 0.5 rounds up to 1; a 2-image class still gives 1
        (0.2, {0: 2, 1: 1, 2: 1, 4: 8}),
        (0.25, {0: 3, 1: 1, 2: 1, 4: 10}),  # 2.5 -> 3, 1.25 -> 1, 0.5 -> 1
        (0.5, {0: 5, 1: 3, 2: 1, 4: 20}),  # 2.5 -> 3; a 2-image class keeps one for training
        (0.9, {0: 9, 1: 4, 2: 1, 4: 36}),  # 4.5 -> 5 is capped at n - 1 = 4
    ],
)
def test_per_class_counts_are_exact(fraction: float, expected_val: dict[int, int]) -> None:
    samples = _samples({0: 10, 1: 5, 2: 2, 3: 1, 4: 40})
    train, val = stratified_split(samples, fraction, seed=0)
    assert dict(Counter(s.label for s in val)) == expected_val
    sizes = {0: 10, 1: 5, 2: 2, 3: 1, 4: 40}
    assert dict(Counter(s.label for s in train)) == {
        k: n - expected_val.get(k, 0) for k, n in sizes.items()
    }


def test_disjoint_complete_and_order_kept() -> None:
    samples = _samples({0: 13, 1: 7, 2: 9})
    train, val = stratified_split(samples, 0.3, seed=5)
    assert not set(train) & set(val)
    assert sorted(train + val, key=samples.index) == samples
    assert train == [s for s in samples if s in set(train)]
    assert val == [s for s in samples if s in set(val)]
    assert {s.label for s in train} == {s.label for s in val} == {0, 1, 2}


def test_deterministic_and_seed_dependent() -> None:
    samples = _samples({0: 30, 1: 30})
    first = stratified_split(samples, 0.2, seed=7)
    assert stratified_split(samples, 0.2, seed=7) == first
    others = [stratified_split(samples, 0.2, seed=s)[1] for s in range(8, 12)]
    assert all(set(v) != set(first[1]) for v in others)


def test_independent_of_input_order() -> None:
    samples = _samples({0: 20, 1: 11})
    shuffled = samples[:]
    random.Random(3).shuffle(shuffled)
    assert set(stratified_split(shuffled, 0.25, seed=1)[1]) == set(
        stratified_split(samples, 0.25, seed=1)[1]
    )


def test_zero_fraction_means_no_validation() -> None:
    samples = _samples({0: 4, 1: 3})
    assert stratified_split(samples, 0.0, seed=0) == (samples, [])


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_fraction_out_of_range(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"validation_fraction must be in \[0, 1\)"):
        stratified_split(_samples({0: 4, 1: 4}), fraction, seed=0)
