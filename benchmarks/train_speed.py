"""Training throughput: the bitcore.train engine against a bare loop on the same model.

The ceiling is a bare `forward -> backward -> optimizer.step` loop over micro-batches already in
memory (no data loading, no schedule, no callbacks). The engine runs the real thing: images
decoded once into the uint8 cache, the (seed, step)-keyed sampler, random crop + flip, the
DataLoader, gradient accumulation, the lr schedule, progress callbacks. Both use the same model,
batch, micro-batch, resolution, precision and thread count, and alternate in rounds.

Two figures per side: images per wall-clock second (best round: the least disturbed one on a
shared machine) and images per CPU-second of this process (robust to other processes' load;
counts the input pipeline too, since with 0 DataLoader workers it runs in this process).

    python benchmarks/train_speed.py                   # tiny-R10x0.25 @64 px and BiT-M-R50x1 @128 px
    python benchmarks/train_speed.py --model BiT-M-R50x1 --crop 128 --batch 32 --micro 32
    python benchmarks/train_speed.py --device cuda --model BiT-M-R50x1 --crop 480 --batch 512
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitcore.data import build_cache, index_directory
from bitcore.data.datasets import CachedImageDataset, default_num_workers
from bitcore.devices import select_device, uses_bf16_autocast
from bitcore.hyperrule import plan as hyperrule_plan
from bitcore.models import create_model
from bitcore.train import Progress, TrainCallbacks, train_model
from bitcore.train.batching import TrainBatches, already_batched
from bitcore.train.loop import flush_denormals, to_channels_last
from bitcore.train.microbatch import choose_micro_batch_size
from bitcore.train.order import DataOrder, StepBatchSampler
from tests.imagegen import make_image_folder


@dataclass(frozen=True)
class Case:
    model: str
    crop: int
    batch: int
    micro: int
    warmup: int  # steps not timed (allocator, oneDNN primitive creation)
    steps: int  # timed steps per round


@dataclass(frozen=True)
class Rate:
    wall: float  # images per wall-clock second
    cpu: float  # images per CPU-second of this process


PRESETS = [
    Case("tiny-R10x0.25", 64, 64, 32, 2, 8),
    Case("BiT-M-R50x1", 128, 32, 32, 1, 2),
]


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _rate(case: Case, first: tuple[float, float], last: tuple[float, float]) -> Rate:
    images = case.steps * case.batch
    return Rate(images / (last[0] - first[0]), images / (last[1] - first[1]))


class StepClock(TrainCallbacks):
    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def on_progress(self, progress: Progress) -> None:
        self.times.append(_clock())


def engine_rate(
    case: Case, train_set: CachedImageDataset, device: torch.device, work: Path, workers: int
) -> Rate:
    plan = hyperrule_plan(
        len(train_set),
        (train_set.cache.size,) * 2,
        steps=case.warmup + case.steps,
        batch_size=case.batch,
        micro_batch_size=case.micro,
        precrop=train_set.cache.size,
        crop=case.crop,
    )
    clock = StepClock()
    torch.manual_seed(0)
    model = create_model(case.model, len(set(train_set.labels)), zero_head=True)
    train_model(
        model,
        train_set,
        plan,
        work,
        device=device,
        callbacks=clock,
        resume=False,
        checkpoint_every=10**9,
        num_workers=workers,
    )
    return _rate(case, clock.times[case.warmup - 1], clock.times[-1])


def loader_rate(case: Case, train_set: CachedImageDataset, num_workers: int) -> float:
    """The engine's input pipeline alone: sampler keys -> cache rows -> crop/flip -> batches."""
    steps = case.warmup + case.steps
    sampler = StepBatchSampler(DataOrder(len(train_set), 0), case.batch, case.micro, 0, steps)
    loader = DataLoader(
        TrainBatches(train_set),
        batch_sampler=sampler,
        collate_fn=already_batched,
        num_workers=num_workers,
    )
    started = time.perf_counter()
    images = sum(len(y) for _, y in loader)
    return images / (time.perf_counter() - started)


def bare_rate(case: Case, device: torch.device, num_classes: int) -> Rate:
    """The ceiling: fixed in-memory micro-batches, the engine's model init, precision, layout
    and denormal setting (without flushing denormals a CPU step measured ~7x slower)."""
    torch.manual_seed(0)
    model = create_model(case.model, num_classes, zero_head=True).to(device)
    bf16 = uses_bf16_autocast(device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    if device.type == "cuda":
        to_channels_last(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    x = (torch.rand(case.micro, 3, case.crop, case.crop, device=device) * 2 - 1).contiguous(
        memory_format=fmt
    )
    y = torch.randint(0, num_classes, (case.micro,), device=device)
    k = case.batch // case.micro
    times = []
    with flush_denormals(device):
        for _ in range(case.warmup + case.steps):
            opt.zero_grad(set_to_none=True)
            for _ in range(k):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = model(x)
                (F.cross_entropy(logits.float(), y) / k).backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(_clock())
    return _rate(case, times[case.warmup - 1], times[-1])


def _engine_micro(model_name: str, batch: int, crop: int, device: torch.device) -> int:
    """What the engine would pick: on CUDA the largest power of two that fits, on CPU <= 32."""
    model = create_model(model_name, 2).to(device)
    if device.type == "cuda":
        to_channels_last(model)
    return choose_micro_batch_size(
        model,
        batch,
        crop,
        device,
        autocast=uses_bf16_autocast(device),
        channels_last=device.type == "cuda",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model")
    parser.add_argument("--crop", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--micro", type=int)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--device", default=None)
    parser.add_argument("--workers", type=int, default=default_num_workers(), help="DataLoader")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    cases = PRESETS
    if args.model:
        batch = args.batch or 32
        crop = args.crop or 128
        micro = args.micro or _engine_micro(args.model, batch, crop, device)
        case = Case(args.model, crop, batch, micro, 1, args.steps or 3)
        cases = [case]
    elif args.steps:
        cases = [Case(c.model, c.crop, c.batch, c.micro, c.warmup, args.steps) for c in cases]

    print(
        f"# torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.threads} threads, {args.workers} DataLoader workers, device {device}, "
        f"bf16 autocast {uses_bf16_autocast(device)}",
        flush=True,
    )
    print(f"# command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}".rstrip())
    print(
        "| model | crop | batch | micro | engine img/s (wall, best) | bare img/s (wall, best) "
        "| ratio | engine img/CPU-s | bare img/CPU-s | ratio | input pipeline alone img/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_image_folder(Path(tmp) / "images", {"a": 64, "b": 64}, size=(96, 112))
        index = index_directory(root)
        for case in cases:
            precrop = case.crop + case.crop // 4  # HyperRule's 160 -> 128 ratio
            cache = build_cache(index, precrop, Path(tmp) / f"cache-{precrop}")
            train_set = CachedImageDataset(cache, index.samples, case.crop, train=True)
            loader = loader_rate(case, train_set, args.workers)
            engine, bare = [], []
            for r in range(args.rounds):
                bare.append(bare_rate(case, device, len(index.classes)))
                work = Path(tmp) / f"state-{r}"
                engine.append(engine_rate(case, train_set, device, work, args.workers))
            ew, bw = max(e.wall for e in engine), max(b.wall for b in bare)
            ec, bc = max(e.cpu for e in engine), max(b.cpu for b in bare)
            print(
                f"| {case.model} | {case.crop} | {case.batch} | {case.micro} | {ew:.1f} "
                f"| {bw:.1f} | {ew / bw:.2f} | {ec:.1f} | {bc:.1f} | {ec / bc:.2f} "
                f"| {loader:.0f} |",
                flush=True,
            )
            print(
                f"#   rounds (wall img/s): engine {[round(e.wall, 1) for e in engine]}, "
                f"bare {[round(b.wall, 1) for b in bare]}",
                flush=True,
            )


if __name__ == "__main__":
    main()
