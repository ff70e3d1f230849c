"""What each normalization costs on this CPU: training step and inference, same network.

Training uses plain ``nn.BatchNorm2d`` for BN (the fastest BN there is, not the simulation),
bitcore's GroupNorm, and GroupNorm + StdConv2d. Inference adds GN + WS with the standardisation
folded into the weights (``bitcore.layers.fold_weight_standardization``), as bitserve serves.
Methods are interleaved call by call so that load from other processes hits all alike, and the
whole measurement is repeated in several rounds (the order of methods rotated each round): each
round gives one median per method, and the spread between rounds is the honest error bar on a
shared machine (one round once put GroupNorm at 1.00x BatchNorm, a rerun at 0.89x).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from bitcore.layers import StdConv2d, fold_weight_standardization
from bitcore.models import create_model
from experiments.normalization.train import MODEL_NAME

TRAIN_METHODS = ("bn", "gn", "gn_ws")
INFER_METHODS = ("bn", "gn", "gn_ws", "gn_ws_folded")


def _model(key: str) -> nn.Module:
    torch.manual_seed(0)
    if key == "bn":
        return create_model(MODEL_NAME, 10, conv=nn.Conv2d, norm=nn.BatchNorm2d)
    if key == "gn":
        return create_model(MODEL_NAME, 10, conv=nn.Conv2d)
    return create_model(MODEL_NAME, 10, conv=StdConv2d)


def _median_ms(
    fns: dict[str, Callable[[], None]], repeats: int, warmup: int, rotate: int = 0
) -> dict[str, float]:
    """One round: every method called `repeats` times, interleaved; median ms per method."""
    keys = list(fns)
    shift = rotate % len(keys)
    order = keys[shift:] + keys[:shift]
    for _ in range(warmup):
        for key in order:
            fns[key]()
    samples: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key in order:
            fn = fns[key]
            start = time.perf_counter()
            fn()
            samples[key].append((time.perf_counter() - start) * 1000.0)
    return {key: statistics.median(values) for key, values in samples.items()}


def measure(
    image_size: int,
    train_batch: int,
    infer_batches: tuple[int, ...],
    repeats: int,
    warmup: int = 3,
    rounds: int = 1,
) -> list[dict[str, object]]:
    """Rows: phase ('train' or 'infer'), method, batch, round, ms (median per call in that round),
    ms_per_image. Every round measures every (phase, batch) once more, all methods interleaved."""
    rows: list[dict[str, object]] = []
    generator = torch.Generator().manual_seed(0)

    x = torch.randn(train_batch, 3, image_size, image_size, generator=generator)
    y = torch.randint(0, 10, (train_batch,), generator=generator)
    train_fns: dict[str, Callable[[], None]] = {}
    for key in TRAIN_METHODS:
        model = _model(key).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        train_fns[key] = step
    groups: list[tuple[str, int, dict[str, Callable[[], None]]]] = [
        ("train", train_batch, train_fns)
    ]

    models = {key: _model(key).eval() for key in INFER_METHODS[:-1]}
    models["gn_ws_folded"] = fold_weight_standardization(copy.deepcopy(models["gn_ws"]))
    for batch in infer_batches:
        xb = torch.randn(batch, 3, image_size, image_size, generator=generator)
        infer_fns: dict[str, Callable[[], None]] = {}
        for key, model in models.items():

            @torch.no_grad()
            def forward(model: nn.Module = model, xb: torch.Tensor = xb) -> None:
                model(xb)

            infer_fns[key] = forward
        groups.append(("infer", batch, infer_fns))
    for round_index in range(rounds):
        for phase, batch, fns in groups:
            for key, ms in _median_ms(fns, repeats, warmup, rotate=round_index).items():
                rows.append(_row(phase, key, batch, round_index, ms))
    return rows


def _row(phase: str, method: str, batch: int, round_index: int, ms: float) -> dict[str, object]:
    return {
        "phase": phase,
        "method": method,
        "batch": batch,
        "round": round_index,
        "ms": ms,
        "ms_per_image": ms / batch,
    }
