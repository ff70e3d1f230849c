"""A decode-once cache of resized training images: one uint8 memmap plus a JSON manifest.

BiT's train transform is resize (squash to `precrop`) -> random crop -> flip (bit_pytorch/
train.py). The resize is deterministic, so it is done once per dataset and size: every epoch,
every DataLoader worker and every DDP rank then reads ready (size, size, 3) pixels from a shared
memory map instead of decoding JPEGs again. The files are written once, atomically (data first,
then the manifest that points at it), and reused while the manifest matches the dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bitcore.atomic import atomic_write, reserve, write_json_atomic
from bitcore.data.index import DatasetError, DatasetIndex, Sample, decode_workers
from bitcore.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from bitcore.transforms import resize_squash

CACHE_FORMAT = "bitserve-image-cache"
CACHE_VERSION = 1


class ImageCache:
    """Read side: rows of (size, size, 3) uint8 pixels addressed by sample path."""

    def __init__(
        self, data_path: Path, rows: dict[str, int], size: int, fingerprint: str, *, reused: bool
    ) -> None:
        self.data_path = data_path
        self.rows = rows
        self.size = size
        self.fingerprint = fingerprint
        self.reused = reused  # True when an existing cache was found valid (nothing decoded)
        self._array: np.ndarray | None = None
        self.array  # noqa: B018  map now: a later rebuild may unlink the file (the map survives)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, sample: Sample) -> int:
        try:
            return self.rows[sample.path]
        except KeyError:
            raise KeyError(f"{sample.path!r} is not in the image cache {self.data_path}") from None

    def pixels(self, sample: Sample) -> np.ndarray:
        """(size, size, 3) uint8, a read-only view into the memory map."""
        return self.array[self.row(sample)]

    @property
    def array(self) -> np.ndarray:
        """All rows, (N, size, size, 3) uint8, mapped lazily (after a fork/spawn too)."""
        if self._array is None:
            shape = (len(self.rows), self.size, self.size, 3)
            if len(self.rows) == 0:
                self._array = np.zeros(shape, dtype=np.uint8)
            else:
                self._array = np.memmap(self.data_path, dtype=np.uint8, mode="r", shape=shape)
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        # A pickled np.memmap is a full in-memory copy: DataLoader workers reopen the map instead.
        state = self.__dict__.copy()
        state["_array"] = None
        return state


def build_cache(
    index: DatasetIndex,
    size: int,
    cache_dir: str | Path,
    *,
    samples: Sequence[Sample] | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageCache:
    """The cache of `samples` (default: all of the index) squashed to size x size.

    Reused without decoding anything when `cache_dir` already holds one built for this size from
    the same dataset state (paths, labels, file sizes and mtimes) that covers the samples.
    """
    if size < 1:
        raise ValueError(f"cache size must be >= 1, got {size}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = sorted({s.path for s in (index.samples if samples is None else samples)})
    fingerprint = index.fingerprint()
    manifest_path = cache_dir / f"images-{size}.json"

    existing = _open_existing(manifest_path, cache_dir, size, fingerprint, paths)
    if existing is not None:
        return existing

    key = hashlib.sha256("\n".join([fingerprint, *paths]).encode()).hexdigest()[:16]
    data_path = cache_dir / f"images-{size}-{key}.u8"
    _write_pixels(index.root, paths, size, data_path, progress, workers, max_pixels)
    rows = {path: i for i, path in enumerate(paths)}
    write_json_atomic(
        manifest_path,
        {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "size": size,
            "fingerprint": fingerprint,
            "data_file": data_path.name,
            "paths": paths,
        },
        indent=None,  # one line: it lists every sample
    )
    for stale in cache_dir.glob(f"images-{size}-*.u8"):
        if stale != data_path:  # open maps of it stay valid on POSIX after the unlink
            stale.unlink(missing_ok=True)
    return ImageCache(data_path, rows, size, fingerprint, reused=False)


def _open_existing(
    manifest_path: Path, cache_dir: Path, size: int, fingerprint: str, paths: list[str]
) -> ImageCache | None:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        manifest.get("format") != CACHE_FORMAT
        or manifest.get("version") != CACHE_VERSION
        or manifest.get("size") != size
        or manifest.get("fingerprint") != fingerprint
    ):
        return None
    rows = {path: i for i, path in enumerate(manifest.get("paths", []))}
    data_path = cache_dir / str(manifest.get("data_file", ""))
    expected_bytes = len(rows) * size * size * 3
    if not all(p in rows for p in paths) or not data_path.is_file():
        return None
    if data_path.stat().st_size != expected_bytes:
        return None
    return ImageCache(data_path, rows, size, fingerprint, reused=True)


def _write_pixels(
    root: Path,
    paths: list[str],
    size: int,
    data_path: Path,
    progress: Callable[[int, int], None] | None,
    workers: int | None,
    max_pixels: int,
) -> None:
    def load(relpath: str) -> np.ndarray:
        try:
            image = decode_image(root / relpath, max_pixels=max_pixels)
        except (ImageError, OSError) as exc:
            raise DatasetError(
                "dataset_changed",
                f"{relpath} no longer decodes ({exc}); index the dataset again",
                {"path": relpath},
            ) from exc
        return np.asarray(resize_squash(image, size), dtype=np.uint8)

    with atomic_write(data_path) as tmp:
        if paths:
            shape = (len(paths), size, size, 3)
            reserve(tmp, int(np.prod(shape)))
            out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
            for i, pixels in enumerate(_ordered_map(load, paths, workers or decode_workers())):
                out[i] = pixels
                if progress is not None:
                    progress(i + 1, len(paths))
            out.flush()
            del out


def _ordered_map(
    function: Callable[[str], np.ndarray], items: Sequence[str], workers: int
) -> Iterator[np.ndarray]:
    """`map` on a thread pool with at most a few results in flight per worker.

    Executor.map submits everything at once; with one slow early image, finished rows of a big
    dataset at 512 px (768 kB each) would pile up in memory waiting for their turn.
    """
    window = 4 * workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[np.ndarray]] = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
