"""The optimisation loop of one process (the only one, or one DDP rank).

BiT fine-tuning (reference bit_pytorch/train.py, docs/bit.md): SGD with momentum 0.9 and no weight
decay; the learning rate is set before every step from the HyperRule schedule (0 at step 0, and
that step is still taken, as in the reference), and training stops when the schedule ends. The
batch of `plan.batch_size` images is accumulated over micro-batches, each loss scaled by
micro / batch so one update equals one step on the whole batch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from bitcore.devices import step_marker
from bitcore.hyperrule import Plan, learning_rate
from bitcore.train import state
from bitcore.train.batching import TrainBatches, already_batched
from bitcore.train.callbacks import Progress, TrainingCancelled
from bitcore.train.mixup import mix, mixup_loss
from bitcore.train.order import DataOrder, StepBatchSampler, mixup_lambda

CANCEL_POLL_SECONDS = 1.0  # between micro-batches; between steps it is always polled
RATE_WINDOW = 20  # steps over which images/s and the ETA are averaged


class Reporter(Protocol):
    """What the loop needs from its caller; TrainCallbacks satisfies it."""

    def on_progress(self, progress: Progress) -> None: ...
    def should_cancel(self) -> bool: ...
    def on_checkpoint(self, step: int) -> None: ...
    def on_validation(self, step: int, metrics: dict[str, Any]) -> None: ...


# Scores the validation split with the model as it is (bitcore.train.engine.evaluate); the loop
# puts the model back in training mode afterwards.
Validate = Callable[[torch.nn.Module], dict[str, Any]]


@dataclass(frozen=True)
class LoopConfig:
    plan: Plan
    seed: int
    micro_batch_size: int  # global: all ranks together
    state_dir: Path
    fingerprint: dict[str, Any] = field(default_factory=dict)
    resume: bool = True
    checkpoint_every: int = 50
    num_workers: int = 0
    autocast: bool = False  # bf16 autocast (CUDA)
    channels_last: bool = False
    # Steps after which rank 0 scores the validation split (with `validate`, single process
    # only): the points of a job's validation curve. Evaluation changes no training state.
    validate_at: tuple[int, ...] = ()


@dataclass(frozen=True)
class LoopOutcome:
    steps: int  # completed optimizer steps (== plan.total_steps when finished)
    resumed_from: int | None
    seconds: float  # wall time of the loop in this process
    images: int  # training images processed in this process's run (all ranks)
    last_loss: float | None


def run_loop(
    model: torch.nn.Module,
    train_set: Any,
    config: LoopConfig,
    device: torch.device,
    reporter: Reporter,
    *,
    rank: int = 0,
    world_size: int = 1,
    validate: Validate | None = None,
) -> LoopOutcome:
    """Train `model` (already on `device`) in place. `train_set[(index, aug_seed)] -> (x, y)`.

    With world_size > 1 the process group must be initialised and `model` is wrapped in DDP
    here; every rank runs the same steps on its slice of every micro-batch.
    """
    with flush_denormals(device):
        return _run_loop(model, train_set, config, device, reporter, rank, world_size, validate)


def _run_loop(
    model: torch.nn.Module,
    train_set: Any,
    config: LoopConfig,
    device: torch.device,
    reporter: Reporter,
    rank: int,
    world_size: int,
    validate: Validate | None,
) -> LoopOutcome:
    plan = config.plan
    started = time.perf_counter()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.0, momentum=plan.momentum, weight_decay=plan.weight_decay
    )
    saved = state.latest(config.state_dir) if config.resume else None
    start = state.load(saved, model, optimizer, config.fingerprint) if saved else 0
    resumed_from = start if saved else None
    total = plan.total_steps
    if start >= total:
        return LoopOutcome(start, resumed_from, time.perf_counter() - started, 0, None)

    net: torch.nn.Module = model
    ddp: DistributedDataParallel | None = None
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = ddp = DistributedDataParallel(model, device_ids=ids)
    mixup = plan.mixup_alpha > 0
    sampler = StepBatchSampler(
        DataOrder(len(train_set), config.seed),
        plan.batch_size,
        config.micro_batch_size,
        start,
        total,
        mixup=mixup,
        rank=rank,
        world_size=world_size,
    )
    loader = DataLoader(
        TrainBatches(train_set, mixup=mixup),
        batch_sampler=sampler,
        collate_fn=already_batched,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    ctx = _Context(config, device, reporter, rank, world_size, optimizer, model)
    scale = config.micro_batch_size / plan.batch_size
    window: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW + 1)
    # From the step this run starts at: a resumed run's first rate is not (start + 1) steps'
    # worth of images over one step's time.
    window.append((time.perf_counter(), start))
    batches = iter(loader)
    end_step = step_marker(device)  # XLA: mark_step() after each optimizer step
    net.train()
    step, loss_value = start, None
    while (lr := learning_rate(plan, step)) is not None:
        if ctx.cancel_agreed(poll=True):
            ctx.cancel(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        lam = mixup_lambda(config.seed, step, plan.mixup_alpha) if mixup else 1.0
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for j in range(sampler.accumulation_steps):
            if j > 0 and ctx.cancel_agreed(poll=False):
                ctx.cancel(step)  # the half-accumulated gradient is dropped
            sync = j == sampler.accumulation_steps - 1
            # DDP all-reduces gradients on the last micro-batch of the step only.
            no_sync = ddp.no_sync() if ddp is not None and not sync else nullcontext()
            with no_sync:
                loss = _micro_step(net, next(batches), lam, config, device)
                (loss * scale).backward()
            step_loss += loss.detach() * scale
        optimizer.step()
        if end_step is not None:
            # Before the loss is read: the step's graph (forward, backward, update) runs as one.
            end_step()
        step += 1
        loss_value = ctx.mean_loss(step_loss)
        now = time.perf_counter()
        window.append((now, step))
        if rank == 0:
            reporter.on_progress(_progress(step, total, loss_value, lr, plan.batch_size, window))
            if step % config.checkpoint_every == 0 or step == total:
                ctx.checkpoint(step)
            if validate is not None and step in config.validate_at and step < total:
                reporter.on_validation(step, validate(model))
                net.train()
    del batches
    seconds = time.perf_counter() - started
    return LoopOutcome(step, resumed_from, seconds, (step - start) * plan.batch_size, loss_value)


@contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """Flush denormal floats to zero on the CPU while training, then restore the old mode.

    Measured on x86 (2 cores, tiny-R10x0.25 at 64 px): once gradients underflow into the
    denormal range a step takes ~1.4 s instead of ~0.2 s. Values below 1.2e-38 carry nothing
    SGD can use, so flushing them changes no result that matters.
    """
    if device.type != "cpu":
        yield
        return
    was_on = bool((torch.tensor([1e-39]) * 1.0)[0] == 0)  # no getter: probe a denormal
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """NHWC weights and activations: what bf16 tensor-core convolutions run fastest on."""
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def _micro_step(
    net: torch.nn.Module,
    batch: list[torch.Tensor],
    lam: float,
    config: LoopConfig,
    device: torch.device,
) -> torch.Tensor:
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    x = batch[0].to(device, non_blocking=True, memory_format=fmt)
    y = batch[1].to(device, non_blocking=True)
    autocast: AbstractContextManager[Any] = (
        torch.autocast(device.type, dtype=torch.bfloat16) if config.autocast else nullcontext()
    )
    if len(batch) == 4:  # MixUp pairs
        xp = batch[2].to(device, non_blocking=True, memory_format=fmt)
        yp = batch[3].to(device, non_blocking=True)
        with autocast:
            logits = net(mix(x, xp, lam))
        return mixup_loss(logits.float(), y, yp, lam)
    with autocast:
        logits = net(x)
    return F.cross_entropy(logits.float(), y)


def _progress(
    step: int, total: int, loss: float | None, lr: float, batch: int, window: deque
) -> Progress:
    (t0, s0), (t1, s1) = window[0], window[-1]
    rate = (s1 - s0) * batch / (t1 - t0) if t1 > t0 and s1 > s0 else 0.0
    eta = (total - step) * (t1 - t0) / (s1 - s0) if s1 > s0 else None
    return Progress(step, total, loss, lr, rate, eta, "training")


class _Context:
    """Cancel agreement across ranks, checkpoints (rank 0 writes them)."""

    def __init__(
        self,
        config: LoopConfig,
        device: torch.device,
        reporter: Reporter,
        rank: int,
        world_size: int,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module,
    ) -> None:
        self.config = config
        self.device = device
        self.reporter = reporter
        self.rank = rank
        self.world_size = world_size
        self.optimizer = optimizer
        self.model = model
        self.last_poll = time.monotonic()
        self.last_saved: int | None = None

    def _wants_cancel(self, poll: bool) -> bool:
        if self.rank != 0:
            return False
        now = time.monotonic()
        if not poll and now - self.last_poll < CANCEL_POLL_SECONDS:
            return False
        self.last_poll = now
        return bool(self.reporter.should_cancel())

    def cancel_agreed(self, poll: bool) -> bool:
        flag = self._wants_cancel(poll)
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t)  # rank 0 decides; every rank takes part so they stay in step
        return bool(t.item() > 0)

    def mean_loss(self, step_loss: torch.Tensor) -> float:
        """The step's loss averaged over all ranks."""
        if self.world_size == 1:
            return float(step_loss)
        t = step_loss.detach().float().reshape(1)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def checkpoint(self, step: int) -> None:
        if self.rank == 0 and self.last_saved != step:
            self.last_saved = step
            state.save(
                self.config.state_dir, step, self.model, self.optimizer, self.config.fingerprint
            )
            self.reporter.on_checkpoint(step)

    def cancel(self, step: int) -> None:
        self.checkpoint(step)
        raise TrainingCancelled(step)
