"""The data order: a pure function of (seed, step), whole epochs, split across ranks exactly."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from bitcore.train.order import (
    DataOrder,
    StepBatchSampler,
    derive_seed,
    mixup_partners,
    splitmix64,
)


def test_epochs_are_seeded_permutations_without_drop_last() -> None:
    order = DataOrder(10, seed=3)
    keys = [order.key(p) for p in range(30)]
    for epoch in range(3):
        indices = [k[0] for k in keys[epoch * 10 : (epoch + 1) * 10]]
        assert sorted(indices) == list(range(10))  # every sample once per epoch
    assert [k[0] for k in keys[:10]] != [k[0] for k in keys[10:20]]  # reshuffled each epoch
    # Batches of 4 over 10 samples wrap across the epoch boundary (no remainder dropped).
    assert order.batch(2, 4) == keys[8:12]
    assert len({k[1] for k in keys}) == 30  # a fresh augmentation seed for every position


def test_order_depends_only_on_seed_and_step() -> None:
    a, b = DataOrder(7, seed=1), DataOrder(7, seed=1)
    late = b.batch(5, 3)  # b jumps straight to step 5, as a resumed run does
    for step in range(5):
        a.batch(step, 3)
    assert a.batch(5, 3) == late
    assert DataOrder(7, seed=2).batch(5, 3) != late


def test_derive_seed_range_and_errors() -> None:
    seeds = {derive_seed(0, 2, i) for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError):
        derive_seed(-1, 2, 0)


@pytest.mark.parametrize("mixup", [False, True])
def test_ranks_take_disjoint_slices_of_every_micro_batch(mixup: bool) -> None:
    order = DataOrder(9, seed=0)
    common = dict(batch_size=8, micro_batch_size=4, start_step=2, stop_step=5, mixup=mixup)
    single = list(StepBatchSampler(order, **common))  # type: ignore[arg-type]
    ranks = [
        list(StepBatchSampler(order, rank=r, world_size=2, **common))  # type: ignore[arg-type]
        for r in range(2)
    ]
    assert len(single) == len(ranks[0]) == 3 * 2  # 3 steps x 2 micro-batches
    for j, micro in enumerate(single):
        assert ranks[0][j] + ranks[1][j] == micro  # rank 0 first half, rank 1 second half
    steps = [single[2 * s] + single[2 * s + 1] for s in range(3)]
    for s, keys in zip(range(2, 5), steps, strict=True):
        if mixup:
            partners = mixup_partners(0, s, 8)
            assert [k[0] for k in keys] == order.batch(s, 8)
            assert [k[1] for k in keys] == [order.batch(s, 8)[p] for p in partners]
        else:
            assert keys == order.batch(s, 8)


def test_sampler_rejects_uneven_splits() -> None:
    order = DataOrder(9, seed=0)
    with pytest.raises(ValueError, match="must divide"):
        StepBatchSampler(order, 8, 3, 0, 1)
    with pytest.raises(ValueError, match="world_size"):
        StepBatchSampler(order, 8, 4, 0, 1, world_size=3)


def test_partner_permutation_is_a_permutation() -> None:
    perms = [mixup_partners(5, s, 16) for s in range(20)]
    assert all(sorted(p) == list(range(16)) for p in perms)
    assert len({tuple(p) for p in perms}) == 20
    assert Counter(len(p) for p in perms) == {16: 20}


def test_splitmix64_matches_the_reference_generator() -> None:
    # First outputs of SplitMix64 seeded with 0 (Vigna's reference C implementation).
    out = splitmix64(np.array([0, 0x9E3779B97F4A7C15], dtype=np.uint64))
    assert out.tolist() == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
