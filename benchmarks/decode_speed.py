"""Decoding a predict image: full JPEG decode + resize vs Pillow's draft mode (issue 13).

    .venv/bin/python benchmarks/decode_speed.py            # full run (about a minute)
    .venv/bin/python benchmarks/decode_speed.py --quick    # fewer repeats, smoke test

What a predict request costs before the forward: `decode_image` (bitcore.images) then
`eval_preprocess` (bitcore.transforms: a bilinear, antialiased squash to the crop). With
`jpeg_min_size=2*crop` libjpeg decodes the JPEG at 1/2, 1/4 or 1/8 scale (as long as both
sides stay >= 2 x crop) and the resize has fewer pixels to filter. The question is whether the
answers move: each case reports the pixel difference of the preprocessed (crop x crop) input
and the largest probability difference of a model, draft vs full, next to the model's
sensitivity: the probability difference when a random 10% of the full decode's input values
move by one 0-255 step.

Images: smooth generated "photos" (gradients, soft-edged shapes, low-frequency texture and a
little sensor noise; never pure noise, whose every pixel a downscale would change), encoded as
JPEG quality 90 with 4:2:0 chroma (Pillow's default). Sizes 1024x768 and 3000x2000 (width x
height), crops 128 and 480 (the BiT-HyperRule's two resolutions, bitcore.hyperrule).

Model: tiny-R10x0.25 with random weights and a random 10-class head scaled so its logits have a
standard deviation of 3 over the full-decode images (confident answers, as a fine-tuned model
gives; a zero head would answer uniform probabilities and hide any difference). Timing: one
thread, full and draft alternated per repetition; medians.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import torch
from PIL import Image

from bitcore.images import decode_image
from bitcore.models import create_model
from bitcore.predict import Predictor
from bitcore.transforms import eval_preprocess

SIZES = ((1024, 768), (3000, 2000))  # (width, height)
CROPS = (128, 480)
FACTORS = (2, 4)  # draft keeps both sides >= factor x crop
NUM_CLASSES = 10
LOGIT_STD = 3.0


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth RGB image with structure: gradient, soft shapes, texture, sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xx / width, yy / height
    top, bottom = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    pixels = top[None, None, :] * (1 - v[..., None]) + bottom[None, None, :] * v[..., None]
    for _ in range(12):  # soft-edged ellipses of various sizes and colours
        cx, cy = rng.uniform(0, 1, 2)
        rx, ry = rng.uniform(0.03, 0.3, 2)
        inside = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2
        edge = np.clip((inside - 1.0) * rng.uniform(8, 40), -50, 50)  # softness; no overflow
        alpha = 1.0 / (1.0 + np.exp(edge))
        colour = rng.uniform(0, 255, 3)
        pixels = pixels * (1 - alpha[..., None]) + colour[None, None, :] * alpha[..., None]
    # Texture: noise at 1/16 and 1/4 of the resolution, upsampled smoothly (bicubic).
    for factor, amplitude in ((16, 18.0), (4, 8.0)):
        small = rng.normal(0, 1, (max(2, height // factor), max(2, width // factor), 3))
        layers = [
            np.asarray(
                Image.fromarray(small[..., c].astype(np.float32), "F").resize(
                    (width, height), Image.Resampling.BICUBIC
                )
            )
            for c in range(3)
        ]
        pixels = pixels + amplitude * np.stack(layers, axis=-1)
    pixels = pixels + rng.normal(0, 2.0, pixels.shape)  # sensor noise
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def preprocess(data: bytes, crop: int, factor: int | None) -> torch.Tensor:
    """Decode (in draft mode keeping both sides >= factor x crop; None: in full) + resize."""
    image = decode_image(data, jpeg_min_size=factor * crop if factor else None)
    return eval_preprocess(image, crop)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def scaled_model(crop: int, images: list[bytes]) -> Predictor:
    """A random tiny model whose head is rescaled to give logits of std LOGIT_STD."""
    torch.manual_seed(0)
    model = create_model("tiny-R10x0.25", NUM_CLASSES)
    head = model.head.conv
    torch.nn.init.normal_(head.weight, std=1.0)
    torch.nn.init.normal_(head.bias, std=1.0)
    batch = torch.stack([preprocess(data, crop, None) for data in images])
    with torch.no_grad():
        model.eval()
        std = float(model(batch).std())
        head.weight.mul_(LOGIT_STD / std)
        head.bias.mul_(LOGIT_STD / std)
    classes = [f"c{i}" for i in range(NUM_CLASSES)]
    return Predictor.from_model(model, classes, crop, "cpu", runtime="torch")


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats, 2 images per size")
    args = parser.parse_args()
    repeats = 2 if args.quick else 9
    count = 2 if args.quick else 6
    torch.set_num_threads(1)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"# {started}, {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, Pillow {Image.__version__}, 1 thread, "
        f"load average before: {load_average()}"
    )
    print(
        f"# {count} JPEGs (quality 90) per size, median of {repeats} alternated repetitions per "
        "image; pixel diff in 0-255 units on the crop x crop input; probs: tiny-R10x0.25, "
        f"{NUM_CLASSES} classes, logit std {LOGIT_STD:g}"
    )
    header = (
        "| image | JPEG KiB | crop | draft >= | decoded at | full ms | draft ms | speed-up | "
        "pixel mean / max diff | max prob diff | +1 on 10% prob diff | top-1 changed |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for width, height in SIZES:
        images = [jpeg(photo(width, height, seed)) for seed in range(count)]
        kib = statistics.mean(len(d) for d in images) / 1024
        for crop in CROPS:
            full = torch.stack([preprocess(d, crop, None) for d in images])
            predictor = scaled_model(crop, images)
            p_full = predictor.predict_tensor(full)
            # How sensitive the model is: +1 (one 0-255 step) on a random 10% of the inputs.
            generator = torch.Generator().manual_seed(crop)
            nudge = (torch.rand(full.shape, generator=generator) < 0.1).float() / 127.5
            baseline = float((predictor.predict_tensor(full + nudge) - p_full).abs().max())
            for factor in FACTORS:
                full_ms: list[float] = []
                draft_ms: list[float] = []
                for data in images:
                    per_full, per_draft = [], []
                    for _ in range(repeats):  # alternated: drift hits both alike
                        per_full.append(timed(lambda d=data, c=crop: preprocess(d, c, None)))
                        per_draft.append(
                            timed(lambda d=data, c=crop, k=factor: preprocess(d, c, k))
                        )
                    full_ms.append(1000 * statistics.median(per_full))
                    draft_ms.append(1000 * statistics.median(per_draft))
                draft = torch.stack([preprocess(d, crop, factor) for d in images])
                pixel = (full - draft).abs() * 127.5  # [-1, 1] back to 0-255 units
                p_draft = predictor.predict_tensor(draft)
                prob_diff = float((p_full - p_draft).abs().max())
                top1 = int((p_full.argmax(1) != p_draft.argmax(1)).sum())
                sized = decode_image(images[0], jpeg_min_size=factor * crop).size
                f, d = statistics.median(full_ms), statistics.median(draft_ms)
                print(
                    f"| {width}x{height} | {kib:.0f} | {crop} | {factor}x crop "
                    f"| {sized[0]}x{sized[1]} | {f:.1f} | {d:.1f} | {f / d:.2f}x "
                    f"| {float(pixel.mean()):.2f} / {float(pixel.max()):.1f} "
                    f"| {prob_diff:.1e} | {baseline:.1e} | {top1}/{count} |",
                    flush=True,
                )
    print(f"# load average after: {load_average()}")


if __name__ == "__main__":
    main()
