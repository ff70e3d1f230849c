"""A decode-once cache of training images, bounded by the dataset's own bytes.

BiT's train transform is resize (squash to `precrop`) -> random crop -> flip (bit_pytorch/
train.py). The cache holds, per image, the cheapest-to-load form that costs no more bytes than
the image's own file, packed into one file with an offsets index:

- RAW: the squashed size x size x 3 pixels (a read, no decoding), when that is no bigger;
- PNG: the squashed pixels, losslessly, when the image is shrunk and the PNG is no bigger;
- ORIGINAL: the file's own bytes, decoded and squashed at load time (in the DataLoader
  workers) with the same calls as the build would use, so the pixels are identical.

A cache at size S is then at most the dataset's bytes (two sizes, the train pre-crop and the
val crop, at most twice), instead of N x S x S x 3: a 30,000-image set of 96 px JPEGs cached at
512 px was 23 GB for a 52 MB upload, because every image was upscaled on disk. Building streams
image by image (a few in flight per thread), so its memory does not grow with the dataset. The
files are written once, atomically (pack, index, then the manifest that points at them), and
reused while the manifest matches the dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from bitcore.atomic import atomic_write, reserve, write_json_atomic
from bitcore.data.index import DatasetError, DatasetIndex, Sample, decode_workers
from bitcore.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from bitcore.transforms import resize_squash

CACHE_FORMAT = "bitserve-image-cache"
CACHE_VERSION = 2

RAW, PNG, ORIGINAL = 0, 1, 2
KIND_NAMES = {RAW: "raw", PNG: "png", ORIGINAL: "original"}
_INDEX_DTYPE = np.dtype("<i8")  # rows of (offset, length, kind) in the pack


class ImageCache:
    """Read side: (size, size, 3) uint8 pixels addressed by sample path."""

    def __init__(
        self,
        data_path: Path,
        rows: dict[str, int],
        size: int,
        fingerprint: str,
        *,
        reused: bool,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.data_path = data_path
        self.index_path = _index_path(data_path)
        self.rows = rows
        self.size = size
        self.fingerprint = fingerprint
        self.reused = reused  # True when an existing cache was found valid (nothing decoded)
        self.max_pixels = max_pixels
        self._entries: np.ndarray | None = None
        self._fd: int | None = None
        self._fd_pid = -1
        # Open now: a later rebuild may unlink the files (an open descriptor survives that).
        self.entries  # noqa: B018
        self._descriptor()

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, sample: Sample) -> int:
        try:
            return self.rows[sample.path]
        except KeyError:
            raise KeyError(f"{sample.path!r} is not in the image cache {self.data_path}") from None

    @property
    def entries(self) -> np.ndarray:
        """(N, 3) int64: offset, length and kind of every row in the pack."""
        if self._entries is None:
            self._entries = np.fromfile(self.index_path, dtype=_INDEX_DTYPE).reshape(-1, 3)
        return self._entries

    def kinds(self) -> dict[str, int]:
        """How many rows are stored in each form."""
        counts = np.bincount(self.entries[:, 2], minlength=3) if len(self.rows) else [0, 0, 0]
        return {KIND_NAMES[k]: int(counts[k]) for k in KIND_NAMES}

    def pixels(self, sample: Sample) -> np.ndarray:
        """(size, size, 3) uint8, a fresh writable array."""
        offset, length, kind = (int(v) for v in self.entries[self.row(sample)])
        fd = self._descriptor()
        if kind == RAW:
            out = np.empty((self.size, self.size, 3), dtype=np.uint8)
            if os.preadv(fd, [out.data], offset) != length:  # straight into the array
                raise OSError(f"short read from the image cache {self.data_path}")
            return out
        data = os.pread(fd, length, offset)
        if kind == PNG:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                return np.array(image.convert("RGB"))
        return np.array(_squash(decode_image(data, max_pixels=self.max_pixels), self.size))

    def _descriptor(self) -> int:
        # One descriptor per process: pread has no shared file position, so threads may share
        # it, and a DataLoader worker (fork or spawn) opens its own on first use.
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self.data_path, os.O_RDONLY)
            self._fd_pid = os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown `os` may be gone
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers reopen the files instead of receiving the index in the pickle.
        state = self.__dict__.copy()
        state["_entries"] = None
        state["_fd"] = None
        state["_fd_pid"] = -1
        return state


def _squash(image: Image.Image, size: int) -> np.ndarray:
    return np.asarray(resize_squash(image, size), dtype=np.uint8)


def _index_path(data_path: Path) -> Path:
    return data_path.with_suffix(".idx")


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
    """The cache of `samples` (default: all of the index) for loading at size x size.

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

    existing = _open_existing(manifest_path, cache_dir, size, fingerprint, paths, max_pixels)
    if existing is not None:
        return existing

    key = hashlib.sha256("\n".join([fingerprint, *paths]).encode()).hexdigest()[:16]
    data_path = cache_dir / f"images-{size}-{key}.pack"
    _write_pack(index.root, paths, size, data_path, progress, workers, max_pixels)
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
    for stale in [
        *cache_dir.glob(f"images-{size}-*.pack"),
        *cache_dir.glob(f"images-{size}-*.idx"),
    ]:
        if stale not in (data_path, _index_path(data_path)):  # open descriptors stay valid
            stale.unlink(missing_ok=True)
    for legacy in cache_dir.glob(f"images-{size}-*.u8"):  # version 1: N x size x size x 3
        legacy.unlink(missing_ok=True)
    return ImageCache(data_path, rows, size, fingerprint, reused=False, max_pixels=max_pixels)


def _open_existing(
    manifest_path: Path,
    cache_dir: Path,
    size: int,
    fingerprint: str,
    paths: list[str],
    max_pixels: int,
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
    index_path = _index_path(data_path)
    if not all(p in rows for p in paths) or not data_path.is_file() or not index_path.is_file():
        return None
    if index_path.stat().st_size != len(rows) * 3 * _INDEX_DTYPE.itemsize:
        return None
    entries = np.fromfile(index_path, dtype=_INDEX_DTYPE).reshape(-1, 3)
    end = int((entries[:, 0] + entries[:, 1]).max()) if len(rows) else 0
    if data_path.stat().st_size != end:
        return None
    return ImageCache(data_path, rows, size, fingerprint, reused=True, max_pixels=max_pixels)


def encode_entry(data: bytes, size: int, max_pixels: int) -> tuple[int, bytes]:
    """(kind, stored bytes) of one image file: the fastest form to load within its own bytes."""
    image = decode_image(data, max_pixels=max_pixels)
    raw_bytes = size * size * 3
    if raw_bytes <= len(data):
        return RAW, _squash(image, size).tobytes()
    if image.width > size or image.height > size:  # shrunk: its PNG may be smaller
        buffer = io.BytesIO()
        Image.fromarray(_squash(image, size)).save(buffer, format="PNG", compress_level=1)
        if buffer.tell() <= len(data):
            return PNG, buffer.getvalue()
    return ORIGINAL, data


def _write_pack(
    root: Path,
    paths: list[str],
    size: int,
    data_path: Path,
    progress: Callable[[int, int], None] | None,
    workers: int | None,
    max_pixels: int,
) -> None:
    def load(relpath: str) -> tuple[int, bytes]:
        try:
            return encode_entry((root / relpath).read_bytes(), size, max_pixels)
        except (ImageError, OSError) as exc:
            raise DatasetError(
                "dataset_changed",
                f"{relpath} no longer decodes ({exc}); index the dataset again",
                {"path": relpath},
            ) from exc

    entries = np.zeros((len(paths), 3), dtype=_INDEX_DTYPE)
    with atomic_write(data_path) as tmp:
        # No entry is bigger than its file: reserving their sum makes a full disk an error
        # now, before anything is decoded, and the surplus is cut off at the end.
        reserve(tmp, _files_bytes(root, paths))
        with open(tmp, "r+b") as out:
            offset = _append_entries(out, load, paths, entries, progress, workers)
            out.truncate(offset)
        # The index before the pack is committed: a manifest is only written after both.
        with atomic_write(_index_path(data_path)) as index_tmp:
            entries.tofile(index_tmp)


def _files_bytes(root: Path, paths: list[str]) -> int:
    total = 0
    for relpath in paths:
        try:
            total += (root / relpath).stat().st_size
        except OSError as exc:
            raise DatasetError(
                "dataset_changed",
                f"{relpath} is gone ({exc}); index the dataset again",
                {"path": relpath},
            ) from exc
    return total


def _append_entries(
    out: BinaryIO,
    load: Callable[[str], tuple[int, bytes]],
    paths: list[str],
    entries: np.ndarray,
    progress: Callable[[int, int], None] | None,
    workers: int | None,
) -> int:
    """Write each path's entry in order, fill `entries`; returns the bytes written."""
    offset = 0
    for i, (kind, stored) in enumerate(_ordered_map(load, paths, workers or decode_workers())):
        out.write(stored)
        entries[i] = (offset, len(stored), kind)
        offset += len(stored)
        if progress is not None:
            progress(i + 1, len(paths))
    return offset


def _ordered_map(
    function: Callable[[str], tuple[int, bytes]], items: Sequence[str], workers: int
) -> Iterator[tuple[int, bytes]]:
    """`map` on a thread pool with at most a few results in flight per worker.

    Executor.map submits everything at once: with one slow early image, finished entries of a
    big dataset would pile up in memory waiting for their turn.
    """
    window = 4 * workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[tuple[int, bytes]]] = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
