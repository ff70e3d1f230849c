"""A data order that is a pure function of (seed, step), so a resumed run sees the same data.

Every random choice of a run (epoch permutation, crop/flip of each item, MixUp lambda and
partners) comes from a generator keyed by the run's seed and the step or position it serves.
Nothing depends on how many steps ran before in this process, on the micro-batch size or on
the number of DDP ranks, so neither a resume nor a different machine changes the data.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

# Stream tags: distinct streams derived from one seed never share a generator.
EPOCH_ORDER, AUGMENT, MIXUP_LAMBDA, MIXUP_PARTNER = 1, 2, 3, 4

Key = tuple[int, int]  # (sample index, augmentation seed): what a train dataset is indexed by


def derive_seed(seed: int, stream: int, counter: int) -> int:
    """A 63-bit seed for (run seed, stream, counter), well mixed by numpy's SeedSequence."""
    if seed < 0 or counter < 0:
        raise ValueError(f"seed and counter must be >= 0, got {seed}, {counter}")
    words = np.random.SeedSequence([seed, stream, counter]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def generator(seed: int, stream: int, counter: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, stream, counter))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(states: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 states (Steele et al., 2014), vectorised:
    output i of the generator seeded with s is splitmix64(s + i * golden)."""
    with np.errstate(over="ignore"):
        z = states + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class DataOrder:
    """An endless stream of training keys: epoch e is a seeded permutation of the N samples,
    epochs follow each other without dropping a remainder, and step s takes stream positions
    [s * batch_size, (s + 1) * batch_size). The augmentation seed of position p is output p of
    a SplitMix64 stream keyed by the run seed: random access, vectorised per batch (a
    SeedSequence per image cost more than the crop itself)."""

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError("the training split is empty")
        self.num_samples = num_samples
        self.seed = seed
        self._aug_base = np.uint64(derive_seed(seed, AUGMENT, 0))
        self._epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            gen = generator(self.seed, EPOCH_ORDER, epoch)
            self._perm = torch.randperm(self.num_samples, generator=gen).numpy()
            self._epoch = epoch
        return self._perm

    def positions(self, start: int, stop: int) -> list[Key]:
        """Keys of stream positions [start, stop)."""
        pos = np.arange(start, stop, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.num_samples)
        indices = np.empty_like(pos)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            indices[where] = self._permutation(int(epoch))[offsets[where]]
        with np.errstate(over="ignore"):
            states = self._aug_base + pos.astype(np.uint64) * _GOLDEN
        seeds = splitmix64(states) >> np.uint64(1)  # 63 bits: a valid torch seed
        return list(zip(indices.tolist(), seeds.tolist(), strict=True))

    def key(self, position: int) -> Key:
        return self.positions(position, position + 1)[0]

    def batch(self, step: int, batch_size: int) -> list[Key]:
        return self.positions(step * batch_size, (step + 1) * batch_size)


def mixup_lambda(seed: int, step: int, alpha: float) -> float:
    """One lambda ~ Beta(alpha, alpha) per optimizer step, shared by its micro-batches
    (reference bit_pytorch/train.py draws it once per step)."""
    rng = np.random.default_rng(derive_seed(seed, MIXUP_LAMBDA, step))
    return float(rng.beta(alpha, alpha))


def mixup_partners(seed: int, step: int, batch_size: int) -> list[int]:
    """The MixUp partner of batch position i is position partners[i] (a random permutation)."""
    return torch.randperm(batch_size, generator=generator(seed, MIXUP_PARTNER, step)).tolist()


class StepBatchSampler:
    """Yields this rank's micro-batches of keys for steps [start_step, stop_step).

    The global batch of a step is cut into micro-batches of `micro_batch_size` (all ranks
    together); rank r takes the r-th slice of every micro-batch. With MixUp each key is a pair
    (own key, partner key) so the partner image is loaded with the item and the mix equals
    lam * x + (1 - lam) * x[perm] over the whole batch, however it is split.
    """

    def __init__(
        self,
        order: DataOrder,
        batch_size: int,
        micro_batch_size: int,
        start_step: int,
        stop_step: int,
        *,
        mixup: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % micro_batch_size or micro_batch_size % world_size:
            raise ValueError(
                f"micro_batch_size {micro_batch_size} must divide batch_size {batch_size} "
                f"and be divisible by world_size {world_size}"
            )
        self.order = order
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.start_step = start_step
        self.stop_step = stop_step
        self.mixup = mixup
        self.rank = rank
        self.world_size = world_size

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step) * self.accumulation_steps

    def __iter__(self) -> Iterator[list]:
        local = self.micro_batch_size // self.world_size
        for step in range(self.start_step, self.stop_step):
            keys: list = self.order.batch(step, self.batch_size)
            if self.mixup:
                partners = mixup_partners(self.order.seed, step, self.batch_size)
                keys = [(keys[i], keys[partners[i]]) for i in range(self.batch_size)]
            for j in range(self.accumulation_steps):
                lo = j * self.micro_batch_size + self.rank * local
                yield keys[lo : lo + local]
