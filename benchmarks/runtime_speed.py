"""Inference runtimes (issue 13): PyTorch eager vs ONNX Runtime vs OpenVINO, images per second.

    .venv/bin/python benchmarks/runtime_speed.py            # full run (several minutes)
    .venv/bin/python benchmarks/runtime_speed.py --quick    # fewer repeats, smoke test
    .venv/bin/python benchmarks/runtime_speed.py --models BiT-M-R50x1 --repeats 15

All three go through the serving path (`Predictor.predict_tensor`: the WS-folded model,
softmax) on the same weights and the same random batch; only the runtime differs ("torch",
"onnxruntime": the graph of bitcore.export in an InferenceSession, or "openvino": the same
graph compiled for OpenVINO's CPU plugin in fp32; both with threads = the CPUs this process may
use). Random weights: the speed of a dense float32 network does not depend on its values. The
runtimes are timed in turn (eager, ORT, OpenVINO, eager, ...) so that drift on a shared machine
hits all alike; the ratios of one run are the numbers that count. Also printed: the largest
probability difference from eager on the timed batch, and the load check's figure (2 fixed
inputs, limit bitcore.runtimes.CHECK_TOLERANCE).
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
from bitcore.runtimes import RUNTIMES

MODELS = (("tiny-R10x0.25", 128), ("BiT-M-R50x1", 128))
BATCH_SIZES = (1, 8)
NUM_CLASSES = 10
SHORT = {"torch": "eager", "onnxruntime": "ORT", "openvino": "OV"}


def _predictors(name: str, size: int) -> dict[str, Predictor]:
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES)
    torch.nn.init.normal_(model.head.conv.weight, std=0.01)  # non-zero scores to compare
    classes = [str(i) for i in range(NUM_CLASSES)]
    return {
        runtime: Predictor.from_model(model, classes, size, "cpu", model_name=name, runtime=runtime)
        for runtime in RUNTIMES
    }


def _time(predictor: Predictor, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    predictor.predict_tensor(batch)
    return time.perf_counter() - start


def measure(
    name: str, size: int, batch_size: int, repeats: int, timed: tuple[str, ...] = RUNTIMES
) -> dict[str, dict[str, float]]:
    """Per runtime: img/s (median and best pass), max prob diff from eager, load check. Only
    the `timed` runtimes are timed (eager is always loaded: it is the reference)."""
    predictors = _predictors(name, size)
    batch = torch.rand((batch_size, 3, size, size), generator=torch.Generator().manual_seed(1))
    batch = batch * 2 - 1
    for predictor in predictors.values():  # warm-up: allocator, kernel choice, arenas
        for _ in range(2):
            predictor.predict_tensor(batch)
    seconds: dict[str, list[float]] = {runtime: [] for runtime in predictors}
    for _ in range(repeats):
        for runtime in timed:
            seconds[runtime].append(_time(predictors[runtime], batch))
    nan = float("nan")
    reference = predictors["torch"].predict_tensor(batch)
    return {
        runtime: {
            "ips": batch_size / statistics.median(seconds[runtime]) if seconds[runtime] else nan,
            "best": min(seconds[runtime], default=nan),
            "diff": float((predictor.predict_tensor(batch) - reference).abs().max()),
            "check": predictor.runtime_max_diff or 0.0,
        }
        for runtime, predictor in predictors.items()
    }


def _row(name: str, size: int, batch_size: int, r: dict[str, dict[str, float]]) -> str:
    eager, ort, ov = r["torch"], r["onnxruntime"], r["openvino"]
    cells = [
        name,
        str(size),
        str(batch_size),
        *(f"{r[runtime]['ips']:.1f}" for runtime in RUNTIMES),
        f"{ort['ips'] / eager['ips']:.2f}x",
        f"{ov['ips'] / eager['ips']:.2f}x",
        f"{ov['ips'] / ort['ips']:.2f}x",
        f"{ort['best'] / ov['best']:.2f}x",
        f"{ort['diff']:.1e} / {ov['diff']:.1e}",
        f"{ort['check']:.1e} / {ov['check']:.1e}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats: a smoke test")
    parser.add_argument("--repeats", type=int, help="timed passes per runtime (default 30)")
    names = [name for name, _ in MODELS]
    parser.add_argument("--models", nargs="+", choices=names, default=names)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCH_SIZES))
    parser.add_argument(
        "--runtimes",
        nargs="+",
        choices=RUNTIMES,
        default=list(RUNTIMES),
        help="the runtimes to time (untimed ones print nan; eager is still the reference)",
    )
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 30)
    print(
        f"# {platform.processor() or platform.machine()}, {available_cpus()} CPUs available, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), load "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}, {repeats} alternating passes"
    )
    ips = " | ".join(f"{SHORT[runtime]} img/s" for runtime in RUNTIMES)
    header = (
        f"| model | px | batch | {ips} | ORT/eager | OV/eager | OV/ORT (median) "
        "| OV/ORT (best) | max prob diff ORT / OV | load check ORT / OV |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for name, size in MODELS:
        if name not in args.models:
            continue
        for batch_size in args.batch_sizes:
            r = measure(name, size, batch_size, repeats, tuple(args.runtimes))
            print(_row(name, size, batch_size, r), flush=True)
    print(f"# load at end {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
