"""What each normalization costs on this CPU: training step and inference, same network.

Training uses plain ``nn.BatchNorm2d`` for BN (the fastest BN there is, not the simulation),
bitcore's GroupNorm, and GroupNorm + StdConv2d. Inference adds GN + WS with the standardisation
folded into the weights (``bitcore.layers.fold_weight_standardization``), as bitserve serves.
Methods are interleaved repeat by repeat so that load from other processes hits all alike; the
median is reported.
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


def _median_ms(fns: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
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
) -> list[dict[str, object]]:
    """Rows: phase ('train' or 'infer'), method, batch, ms (median per call), ms_per_image."""
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
    for key, ms in _median_ms(train_fns, repeats, warmup).items():
        rows.append(_row("train", key, train_batch, ms))

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
        for key, ms in _median_ms(infer_fns, repeats, warmup).items():
            rows.append(_row("infer", key, batch, ms))
    return rows


def _row(phase: str, method: str, batch: int, ms: float) -> dict[str, object]:
    return {"phase": phase, "method": method, "batch": batch, "ms": ms, "ms_per_image": ms / batch}
