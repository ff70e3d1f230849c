"""Int8 serving (issue 13): how often int8 answers like float32, and how much faster it is.

    .venv/bin/python benchmarks/int8_serving.py             # both parts (about 4 minutes)
    .venv/bin/python benchmarks/int8_serving.py --quick     # smoke test
    .venv/bin/python benchmarks/int8_serving.py --part speed

Part "agreement": a real fine-tune with the guard. scikit-learn's handwritten digits (1797
real scans, upscaled to 32 px PNG class folders as in tests/integration/test_digits_accuracy.py)
train tiny-R10x0.25 from scratch with `finetune(..., serving_precision="int8")`: the engine
calibrates on 64 training images and measures top-1 agreement with float32 on the 179
validation images (bitcore.quantize.int8_guard). Printed: float32 accuracy, the guard's
agreement and decision, and the accuracy of the predictor that serves the artifact (int8 when
the guard passed, else float32) on the same split.

Part "speed": float32 vs int8 graphs of the same model on ONNX Runtime (CPU execution
provider, intra-op threads = available CPUs, no spinning), as the predictor runs them: the
exported graph of bitcore.export and its int8 QDQ form from bitcore.quantize.quantize_int8,
calibrated on 16 generated class images. Random weights (seeded): speed does not depend on the
values. Timed alternately (fp32, int8, fp32, ...), median of the passes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.imagegen, when run as a script

from bitcore.data.index import available_cpus
from bitcore.export import export_onnx_bytes, serving_form
from bitcore.hyperrule import plan as hyperrule_plan
from bitcore.models import create_model
from bitcore.predict import Predictor
from bitcore.quantize import quantize_int8
from bitcore.runtimes import OnnxRuntimeForward
from bitcore.train import finetune
from bitcore.transforms import eval_preprocess
from tests.imagegen import class_image

SPEED_MODELS = (("tiny-R10x0.25", 128), ("BiT-M-R50x1", 128))
BATCH_SIZES = (1, 8)
NUM_CLASSES = 10
DIGITS_OVERRIDES = {"precrop": 36, "crop": 32, "batch_size": 64, "base_lr": 0.03}


def write_digits(root: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image / 16.0 * 255).round().astype(np.uint8)
        Image.fromarray(pixels, "L").convert("RGB").resize(
            (32, 32), Image.Resampling.BILINEAR
        ).save(folder / f"{i:04d}.png")
    return root


def agreement(steps: int | None) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="bitserve-int8-") as tmp:
        folder = write_digits(Path(tmp) / "digits")
        overrides = dict(DIGITS_OVERRIDES, **({"steps": steps} if steps else {}))
        plan = hyperrule_plan(1797, (32, 32), **overrides)  # type: ignore[arg-type]
        started = time.perf_counter()
        result = finetune(
            folder,
            "tiny-R10x0.25",
            plan,
            Path(tmp) / "model",
            from_scratch=True,
            seed=0,
            serving_precision="int8",
        )
        seconds = time.perf_counter() - started
        check = result.metrics["precision"]
        int8_accuracy = _served_accuracy(result.artifact_dir, folder)
        return [
            "| model | steps | validation images | fp32 accuracy | served accuracy | top-1 "
            "agreement | served | fine-tune + guard s |",
            "|---|---|---|---|---|---|---|---|",
            f"| tiny-R10x0.25 (digits, 32 px) | {plan.total_steps} | "
            f"{check['validation_images']} | {result.metrics['accuracy']:.2%} | "
            f"{int8_accuracy:.2%} | {check['agreeing']}/{check['validation_images']} = "
            f"{check['agreement']:.2%} | {check['served']} | {seconds:.0f} |",
            "",
            f"guard: {check['reason']}; load-check difference {check['check_max_diff']:.2g}",
        ]


def _served_accuracy(artifact: Path, folder: Path) -> float:
    """Accuracy of the predictor that serves the artifact (int8 if the guard passed) on the
    fine-tune's own validation split (same split function, same seed)."""
    from bitcore.data import index_directory
    from bitcore.data.split import stratified_split

    index = index_directory(folder)
    _train, val = stratified_split(index.samples, 0.1, 0)
    predictor = Predictor.load(artifact, runtime="onnxruntime")
    images = [Image.open(index.root / sample.path).convert("RGB") for sample in val]
    probs = predictor.predict_tensor(predictor.preprocess(images))
    labels = torch.tensor([sample.label for sample in val])
    return float((probs.argmax(1) == labels).float().mean())


def speed(passes: int) -> list[str]:
    lines = [
        "| model | px | batch | fp32 img/s | int8 img/s | int8/fp32 | top-1 same (batch) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, crop in SPEED_MODELS:
        torch.manual_seed(0)
        model = create_model(name, NUM_CLASSES)
        torch.nn.init.normal_(model.head.conv.weight, std=0.01)
        folded = serving_form(model)
        exported = export_onnx_bytes(
            folded, crop=crop, classes=[str(i) for i in range(NUM_CLASSES)], model_name=name
        )
        calibration = torch.stack(
            [eval_preprocess(class_image(i % 4, 4, (crop, crop), seed=i), crop) for i in range(16)]
        )
        cpu = torch.device("cpu")
        fp32 = OnnxRuntimeForward(exported, cpu)
        int8 = OnnxRuntimeForward(quantize_int8(exported, [calibration]), cpu)
        for batch_size in BATCH_SIZES:
            batch = torch.stack(
                [
                    eval_preprocess(class_image(i % 4, 4, (crop, crop), seed=100 + i), crop)
                    for i in range(batch_size)
                ]
            )
            times: dict[str, list[float]] = {"fp32": [], "int8": []}
            for forward in (fp32, int8):
                forward(batch)  # warm-up
            for _ in range(passes):
                for key, forward in (("fp32", fp32), ("int8", int8)):
                    start = time.perf_counter()
                    forward(batch).softmax(dim=1)
                    times[key].append(time.perf_counter() - start)
            rate = {k: batch_size / statistics.median(v) for k, v in times.items()}
            same = int((fp32(batch).argmax(1) == int8(batch).argmax(1)).sum())
            lines.append(
                f"| {name} | {crop} | {batch_size} | {rate['fp32']:.1f} | {rate['int8']:.1f} | "
                f"{rate['int8'] / rate['fp32']:.2f}x | {same}/{batch_size} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("agreement", "speed", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="few steps and passes")
    args = parser.parse_args()
    print(
        f"# int8 serving: {platform.machine()}, {available_cpus()} CPUs, torch "
        f"{torch.__version__}, load average {os.getloadavg()[0]:.1f}"
    )
    if args.part in ("agreement", "both"):
        print("\n".join(agreement(steps=40 if args.quick else None)))
        print()
    if args.part in ("speed", "both"):
        print("\n".join(speed(passes=3 if args.quick else 15)))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
