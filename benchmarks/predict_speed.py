"""Prediction speed: Weight Standardization on every forward pass vs folded once at load.

    .venv/bin/python benchmarks/predict_speed.py            # full run (a few minutes)
    .venv/bin/python benchmarks/predict_speed.py --quick    # fewer repeats, smoke test

Both forms go through the serving path (`Predictor.predict_tensor`: inference mode, softmax)
on the same random weights and the same random batch; only `fold_ws` differs. The two forms are
timed alternately (A, B, A, B, ...) so that drift on a shared machine hits both alike: the
ratio measured in one run is the number that counts, not the absolute images per second.
The ratio is reported three ways: from median wall-clock time, from median CPU time of this
process (which waiting for a core held by another process does not inflate), and from the
fastest pass of each form (the one least disturbed, as `timeit` recommends).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch
from loopback import cpu_model  # benchmarks/ is on sys.path when run as a script

from bitcore.models import create_model
from bitcore.predict import Predictor

# (registry name, input size): the CPU demo model and the flagship published architecture.
MODELS = (("small-R26x0.5", 128), ("BiT-M-R50x1", 128))
BATCH_SIZES = (1, 8)
NUM_CLASSES = 10  # a fine-tuned head; the 21k-class upstream head is not what is served


@dataclass
class Row:
    model: str
    size: int
    batch: int
    training_form: float  # images per (wall) second, WS on every forward pass
    folded: float  # images per (wall) second, WS folded once at load
    cpu_speedup: float  # ratio of median CPU seconds per pass, training form / folded
    best_speedup: float  # ratio of the fastest passes (the least disturbed by other processes)
    max_prob_diff: float  # the two forms must give the same answers

    @property
    def speedup(self) -> float:
        return self.folded / self.training_form


def load_average() -> str:
    """Other processes on the same cores skew absolute numbers: record how busy it was."""
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def time_once(predictor: Predictor, batch: torch.Tensor) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one forward pass.

    CPU time is the steadier figure on a shared machine: waiting for a core that another
    process holds counts in wall time but not in CPU time.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    predictor.predict_tensor(batch)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(name: str, size: int, batch_size: int, repeats: int, warmup: int) -> Row:
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES)
    classes = [f"class_{i}" for i in range(NUM_CLASSES)]
    training_form = Predictor.from_model(model, classes, size, "cpu", fold_ws=False)
    folded = Predictor.from_model(model, classes, size, "cpu", fold_ws=True)
    del model
    batch = torch.rand((batch_size, 3, size, size), generator=torch.Generator().manual_seed(1))
    batch = batch * 2 - 1
    diff = (training_form.predict_tensor(batch) - folded.predict_tensor(batch)).abs().max()
    for _ in range(warmup):
        time_once(training_form, batch)
        time_once(folded, batch)
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(time_once(training_form, batch))
        times_b.append(time_once(folded, batch))
    wall_a, cpu_a = (statistics.median(t) for t in zip(*times_a, strict=True))
    wall_b, cpu_b = (statistics.median(t) for t in zip(*times_b, strict=True))
    return Row(
        model=name,
        size=size,
        batch=batch_size,
        training_form=batch_size / wall_a,
        folded=batch_size / wall_b,
        cpu_speedup=cpu_a / cpu_b,
        best_speedup=min(t for t, _ in times_a) / min(t for t, _ in times_b),
        max_prob_diff=float(diff),
    )


def format_table(rows: list[Row]) -> str:
    lines = [
        "| model | input | batch | training form (WS every pass), img/s "
        "| folded (WS once), img/s | speed-up | speed-up (CPU time) | speed-up (best pass) "
        "| max prob diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.size} px | {r.batch} | {r.training_form:.1f} | {r.folded:.1f} "
            f"| {r.speedup:.2f}x | {r.cpu_speedup:.2f}x | {r.best_speedup:.2f}x "
            f"| {r.max_prob_diff:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per form")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 21)
    warmup = 1 if args.quick else 3
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}, "
        f"{os.cpu_count()} logical CPUs visible; median of {repeats} timed passes per form "
        f"after {warmup} warm-up passes, forms alternated; load average {load_average()}"
    )
    rows = []
    for name, size in MODELS:
        for batch_size in BATCH_SIZES:
            row = measure(name, size, batch_size, repeats, warmup)
            print(
                f"  {name} {size}px batch {batch_size}: {row.training_form:.1f} -> "
                f"{row.folded:.1f} img/s ({row.speedup:.2f}x wall, {row.cpu_speedup:.2f}x CPU)",
                flush=True,
            )
            rows.append(row)
    print()
    print(format_table(rows))
    print(f"\nload average (1, 5, 15 min) at the end: {load_average()}")


if __name__ == "__main__":
    main()
