"""Inference runtimes (issue 13): PyTorch eager vs ONNX Runtime, images per second.

    .venv/bin/python benchmarks/runtime_speed.py            # full run (about two minutes)
    .venv/bin/python benchmarks/runtime_speed.py --quick    # fewer repeats, smoke test

Both go through the serving path (`Predictor.predict_tensor`: the WS-folded model, softmax)
on the same weights and the same random batch; only the runtime differs ("torch" or
"onnxruntime", the graph of bitcore.export in an InferenceSession with intra-op threads = the
CPUs this process may use). Random weights: the speed of a dense float32 network does not
depend on its values. The two are timed alternately (A, B, A, B, ...) so that drift on a
shared machine hits both alike; the ratio of one run is the number that counts. Also printed:
the largest probability difference between the two (the load check's measure, limit 1e-4).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from bitcore.cpus import available_cpus
from bitcore.models import create_model
from bitcore.predict import Predictor

MODELS = (("tiny-R10x0.25", 128), ("BiT-M-R50x1", 128))
BATCH_SIZES = (1, 8)
NUM_CLASSES = 10


def _predictors(name: str, size: int) -> tuple[Predictor, Predictor]:
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES)
    torch.nn.init.normal_(model.head.conv.weight, std=0.01)  # non-zero scores to compare
    classes = [str(i) for i in range(NUM_CLASSES)]
    eager = Predictor.from_model(model, classes, size, "cpu", model_name=name)
    onnx = Predictor.from_model(model, classes, size, "cpu", model_name=name, runtime="onnxruntime")
    return eager, onnx


def _time(predictor: Predictor, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    predictor.predict_tensor(batch)
    return time.perf_counter() - start


def measure(name: str, size: int, batch_size: int, repeats: int) -> dict[str, float]:
    eager, onnx = _predictors(name, size)
    batch = torch.rand((batch_size, 3, size, size), generator=torch.Generator().manual_seed(1))
    batch = batch * 2 - 1
    for predictor in (eager, onnx):  # warm-up: allocator, kernel choice, ORT's arena
        for _ in range(2):
            predictor.predict_tensor(batch)
    eager_s: list[float] = []
    onnx_s: list[float] = []
    for _ in range(repeats):
        eager_s.append(_time(eager, batch))
        onnx_s.append(_time(onnx, batch))
    diff = float((eager.predict_tensor(batch) - onnx.predict_tensor(batch)).abs().max())
    eager_ips = batch_size / statistics.median(eager_s)
    onnx_ips = batch_size / statistics.median(onnx_s)
    return {
        "eager": eager_ips,
        "onnx": onnx_ips,
        "ratio": onnx_ips / eager_ips,
        "best_ratio": min(eager_s) / min(onnx_s),
        "diff": diff,
        "check": onnx.runtime_max_diff or 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke test")
    args = parser.parse_args()
    repeats = 5 if args.quick else 30
    print(
        f"# {platform.processor() or platform.machine()}, {available_cpus()} CPUs available, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), load "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}, {repeats} alternating passes"
    )
    header = (
        "| model | px | batch | eager img/s | onnxruntime img/s | ORT/eager (median) "
        "| ORT/eager (best) | max prob diff | load check |"
    )
    print(header)
    print("|" + "---|" * 9)
    for name, size in MODELS:
        for batch_size in BATCH_SIZES:
            r = measure(name, size, batch_size, repeats)
            print(
                f"| {name} | {size} | {batch_size} | {r['eager']:.1f} | {r['onnx']:.1f} "
                f"| {r['ratio']:.2f}x | {r['best_ratio']:.2f}x | {r['diff']:.1e} "
                f"| {r['check']:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
