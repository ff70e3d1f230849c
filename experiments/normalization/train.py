"""The four networks, one training loop, and the measurements taken on them.

Every network is bitcore's ResNetV2 ("tiny-R10x0.25": one unit per stage, width 1/4) built by
``bitcore.models.create_model`` with only the injected layer types changed: ``conv`` is
``nn.Conv2d`` or bitcore's ``StdConv2d`` (Weight Standardization), ``norm`` is the per-device
``ChunkedBatchNorm2d`` or bitcore's ``group_norm`` (8 groups for this width).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from bitcore.layers import StdConv2d
from bitcore.models import ResNetV2, create_model
from experiments.normalization.chunked_bn import ChunkedBatchNorm2d, chunked_batch_norm
from experiments.normalization.data import Split

MODEL_NAME = "tiny-R10x0.25"
EVAL_BATCH = 256


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    batch_norm: bool  # ChunkedBatchNorm2d if True, else bitcore's GroupNorm
    weight_std: bool  # bitcore's StdConv2d if True, else nn.Conv2d


METHODS = {
    m.key: m
    for m in (
        Method("bn", "BatchNorm", batch_norm=True, weight_std=False),
        Method("bn_ws", "BatchNorm + WS", batch_norm=True, weight_std=True),
        Method("gn", "GroupNorm", batch_norm=False, weight_std=False),
        Method("gn_ws", "GroupNorm + WS (BiT)", batch_norm=False, weight_std=True),
    )
}


def build_model(method: Method, num_classes: int, device_batch: int) -> ResNetV2:
    conv = StdConv2d if method.weight_std else nn.Conv2d
    norm = chunked_batch_norm(device_batch) if method.batch_norm else None  # None: GN, 8 groups
    return create_model(MODEL_NAME, num_classes, conv=conv, norm=norm)


@dataclass(frozen=True)
class TrainConfig:
    """SGD with momentum, linear warm-up then cosine decay; the same for every network."""

    steps: int
    global_batch: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0  # BiT fine-tunes without weight decay (docs/bit.md, HyperRule)
    warmup_fraction: float = 0.1
    log_every: int = 10

    def lr_at(self, step: int) -> float:
        warmup = max(1, int(self.steps * self.warmup_fraction))
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled index batches of exactly `batch` (epoch remainder dropped)."""
    if batch > n:
        raise ValueError(f"global batch {batch} is larger than the {n} training images")
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            yield order[start : start + batch]


def batch_norms(model: nn.Module) -> list[ChunkedBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, ChunkedBatchNorm2d)]


def train(
    model: nn.Module, data: Split, config: TrainConfig, seed: int, *, freeze_bn: bool = False
) -> list[tuple[int, float]]:
    """Train in place; returns (step, mean loss over the last `log_every` steps) points.

    `freeze_bn` keeps every BatchNorm in eval mode (running statistics, none updated): the
    usual workaround when per-device batches are too small for batch statistics.
    A non-finite loss stops training and is reported as a NaN point.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    model.train()
    if freeze_bn:
        for bn in batch_norms(model):
            bn.eval()
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    batches = _batches(len(data), config.global_batch, generator)
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        index = next(batches)
        loss = F.cross_entropy(model(data.images[index]), data.labels[index])
        if not torch.isfinite(loss):
            curve.append((step + 1, math.nan))
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append(loss.item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            curve.append((step + 1, sum(window) / len(window)))
            window.clear()
    model.eval()
    return curve


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    """Deployed behaviour: eval mode (BatchNorm uses its running statistics)."""
    model.eval()
    correct = 0
    for start in range(0, len(data), EVAL_BATCH):
        logits = model(data.images[start : start + EVAL_BATCH])
        correct += int((logits.argmax(1) == data.labels[start : start + EVAL_BATCH]).sum())
    return correct / len(data)


@torch.no_grad()
def batch_stats_accuracy(model: nn.Module, data: Split, seed: int) -> float:
    """Accuracy when BatchNorm uses the statistics of the test batch, device by device.

    The test images are shuffled (fixed seed) and cut into the same per-device chunks as in
    training; the last images that do not fill a chunk are left out. Running statistics are
    restored afterwards. For GroupNorm networks this equals `accuracy`.
    """
    norms = batch_norms(model)
    if not norms:
        return accuracy(model, data)
    device_batch = norms[0].device_batch
    saved = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in norms]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    order = order[: len(data) // device_batch * device_batch]
    model.train()
    correct = 0
    for start in range(0, len(order), EVAL_BATCH // device_batch * device_batch):
        index = order[start : start + EVAL_BATCH // device_batch * device_batch]
        correct += int((model(data.images[index]).argmax(1) == data.labels[index]).sum())
    for bn, (mean, var) in zip(norms, saved, strict=True):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    model.eval()
    return correct / len(order)


@torch.no_grad()
def recalibrate(model: nn.Module, data: Split) -> None:
    """Re-estimate BatchNorm running statistics on `data` (a cumulative average, no training).

    One device-sized chunk per forward, so every image contributes (not only rank 0's).
    """
    norms = batch_norms(model)
    if not norms:
        return
    device_batch = norms[0].device_batch
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for start in range(0, len(data) - device_batch + 1, device_batch):
        model(data.images[start : start + device_batch])
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
    model.eval()


@torch.no_grad()
def stats_mismatch(model: nn.Module, data: Split) -> float:
    """How far the stored running means are from `data`'s, in `data`'s standard deviations.

    Mean over every BatchNorm layer and channel of |running_mean - mean| / std, where mean and
    std are the layer input's statistics over all of `data` (the network in eval mode).
    """
    norms = batch_norms(model)
    if not norms:
        return 0.0
    gaps: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        assert isinstance(module, ChunkedBatchNorm2d)
        var, mean = torch.var_mean(inputs[0], dim=(0, 2, 3), unbiased=False)
        gaps.append(((module.running_mean - mean).abs() / torch.sqrt(var + module.eps)).mean())

    handles = [bn.register_forward_hook(hook) for bn in norms]
    try:
        model.eval()
        model(data.images)
    finally:
        for handle in handles:
            handle.remove()
    return float(torch.stack(gaps).mean())
