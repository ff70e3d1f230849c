"""Training cache size, build speed and build memory on a 30,000-image dataset of 96 px JPEGs.

The finding of issue 12: such a dataset (a 52 MB zip) cached at the HyperRule pre-crop (512 px)
took 23 GB, every image upscaled on disk, and the building process peaked at 19 GB resident.
This generates the dataset (JPEG quality 75, ~2.5 kB an image), indexes it, then builds, in a
fresh process each (so its peak RSS is the build's own), the cache at the pre-crop, as the
upload does, and at the crop, as a job's validation split does (in the same directory: its
rows of original bytes point into the first cache's pack). It reports the cache bytes
against the dataset's bytes, the build time and throughput, the builder's peak RSS, and the
load rate of one DataLoader worker (decode + squash to the pre-crop, one thread).

    python benchmarks/cache_size.py                 # 30,000 images
    python benchmarks/cache_size.py --images 3000   # quicker
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitcore.data import build_cache, index_directory
from bitcore.data.index import DatasetIndex
from bitcore.hyperrule import plan as hyperrule_plan
from tests.imagegen import class_image

CLASSES = 10


def make_dataset(root: Path, images: int, side: int) -> int:
    """`images` JPEGs of side x side over CLASSES folders; returns their total bytes."""
    total = 0
    for i in range(images):
        label = i % CLASSES
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        class_image(label, CLASSES, (side, side), seed=i, noise=8).save(buffer, "JPEG", quality=75)
        (folder / f"{i:06d}.jpg").write_bytes(buffer.getvalue())
        total += buffer.tell()
    return total


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _build(index: DatasetIndex, size: int, cache_dir: str, out: multiprocessing.Queue) -> None:
    before = _rss_mb()
    started = time.perf_counter()
    cache = build_cache(index, size, cache_dir)
    seconds = time.perf_counter() - started
    out.put(
        {"seconds": seconds, "rss_before_mb": before, "rss_peak_mb": _rss_mb(), **cache.kinds()}
    )


def build_in_child(index: DatasetIndex, size: int, cache_dir: Path) -> dict:
    """The build in a fresh (spawned) process: its ru_maxrss is the build's peak alone."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_build, args=(index, size, str(cache_dir), queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def load_rate(index: DatasetIndex, size: int, cache_dir: Path, count: int) -> float:
    cache = build_cache(index, size, cache_dir)  # reused
    samples = index.samples[:count]
    started = time.perf_counter()
    for sample in samples:
        cache.pixels(sample)
    return len(samples) / (time.perf_counter() - started)


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--side", type=int, default=96)
    parser.add_argument("--load-sample", type=int, default=2000)
    args = parser.parse_args()
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}".rstrip(),
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        started = time.perf_counter()
        dataset_bytes = make_dataset(root, args.images, args.side)
        print(
            f"# generated {args.images} images, {dataset_bytes / 1e6:.1f} MB, "
            f"in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        index = index_directory(root)
        plan = hyperrule_plan(index.num_images, index.median_size)
        cache_dir = Path(tmp) / "cache"  # one directory per dataset, as the service keeps it
        print(
            "| cache | size | bytes | / dataset bytes | v1 bytes (N x S x S x 3) | build s "
            "| images/s | builder peak RSS MB (idle child) | stored raw/png/original/shared "
            "| load img/s (1 thread) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
        before = 0
        for name, size in (("train (upload)", plan.precrop), ("val (job)", plan.crop)):
            result = build_in_child(index, size, cache_dir)
            total = _dir_bytes(cache_dir)
            stored, before = total - before, total
            rate = load_rate(index, size, cache_dir, args.load_sample)
            print(
                f"| {name} | {size} | {stored / 1e6:.1f} MB | {stored / dataset_bytes:.3f} "
                f"| {index.num_images * size * size * 3 / 1e9:.1f} GB | {result['seconds']:.1f} "
                f"| {index.num_images / result['seconds']:.0f} | {result['rss_peak_mb']:.0f} "
                f"({result['rss_before_mb']:.0f}) | {result['raw']}/{result['png']}/"
                f"{result['original']}/{result['shared']} | {rate:.0f} |",
                flush=True,
            )
        print(
            f"# both caches: {before / 1e6:.1f} MB = {before / dataset_bytes:.3f} x the "
            f"dataset's {dataset_bytes / 1e6:.1f} MB",
            flush=True,
        )


if __name__ == "__main__":
    main()
