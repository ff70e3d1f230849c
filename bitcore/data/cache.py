"""A decode-once cache of training images, bounded by the dataset's own bytes.

BiT's train transform is resize (squash to `precrop`) -> random crop -> flip (bit_pytorch/
train.py). The cache holds, per image, the cheapest-to-load form that costs no more bytes than
the image's own file, packed into one file with an offsets index:

- RAW: the squashed size x size x 3 pixels (a read, no decoding), when that is no bigger;
- PNG: the squashed pixels, losslessly, when the image is shrunk and the PNG is no bigger;
- ORIGINAL: the file's own bytes, decoded and squashed at load time (in the DataLoader
  workers) with the same calls as the build would use, so the pixels are identical;
- SHARED: an ORIGINAL entry kept in the pack of another size's cache in the same directory (the
  "donor", same dataset fingerprint), read from there: the train cache at the pre-crop and the
  val cache at the crop of a dataset of small images both need every file's own bytes, and one
  copy serves both.

Every entry is at most min(file bytes, S x S x 3), so a cache at size S is at most the dataset's
bytes, instead of N x S x S x 3: a 30,000-image set of 96 px JPEGs cached at 512 px was 23 GB for
a 52 MB upload, because every image was upscaled on disk. With SHARED entries the two sizes of a
dataset of small images together take about the dataset's bytes once. Building streams
image by image (a few in flight per thread), so its memory does not grow with the dataset. The
files are written once, atomically (pack, index, then the manifest that points at them), and
reused while the manifest matches the dataset. A cache with SHARED entries records its donor's
pack by name and the SHA-256 of the donor's index: when the donor is rebuilt or removed (the
dataset changed) the referring cache no longer matches and is rebuilt too, never misread.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from bitcore.atomic import atomic_write, reserve, write_json_atomic
from bitcore.data.index import DatasetError, DatasetIndex, Sample, decode_workers
from bitcore.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from bitcore.transforms import resize_squash

CACHE_FORMAT = "bitserve-image-cache"
CACHE_VERSION = 3  # 3: SHARED entries (version 2 caches are rebuilt, not misread)

RAW, PNG, ORIGINAL, SHARED = 0, 1, 2, 3
KIND_NAMES = {RAW: "raw", PNG: "png", ORIGINAL: "original", SHARED: "shared"}
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
        donor_path: Path | None = None,
    ) -> None:
        self.data_path = data_path
        self.index_path = _index_path(data_path)
        self.donor_path = donor_path  # the other size's pack that SHARED rows point into
        self.rows = rows
        self.size = size
        self.fingerprint = fingerprint
        self.reused = reused  # True when an existing cache was found valid (nothing decoded)
        self.max_pixels = max_pixels
        self._entries: np.ndarray | None = None
        self._fd: int | None = None
        self._fd_pid = -1
        self._donor_fd: int | None = None
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
        kinds = len(KIND_NAMES)
        counts = np.bincount(self.entries[:, 2], minlength=kinds) if len(self.rows) else [0] * 4
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
        if kind == SHARED:
            fd = self._descriptor(donor=True)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise OSError(f"short read from the image cache {self.data_path}")
        if kind == PNG:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                return np.array(image.convert("RGB"))
        return np.array(_squash(decode_image(data, max_pixels=self.max_pixels), self.size))

    def _descriptor(self, *, donor: bool = False) -> int:
        # One descriptor per file and process: pread has no shared file position, so threads
        # may share it, and a DataLoader worker (fork or spawn) opens its own on first use.
        if self._fd is None or self._fd_pid != os.getpid():
            self.close()
            self._fd = os.open(self.data_path, os.O_RDONLY)
            if self.donor_path is not None:
                self._donor_fd = os.open(self.donor_path, os.O_RDONLY)
            self._fd_pid = os.getpid()
        if donor:
            if self._donor_fd is None:
                raise OSError(f"the image cache {self.data_path} has shared rows but no donor")
            return self._donor_fd
        return self._fd

    def close(self) -> None:
        if self._fd_pid == os.getpid():  # a forked worker never closes its parent's descriptors
            for fd in (self._fd, self._donor_fd):
                if fd is not None:
                    os.close(fd)
        self._fd = self._donor_fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown `os` may be gone
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers reopen the files instead of receiving the index in the pickle.
        state = self.__dict__.copy()
        state["_entries"] = None
        state["_fd"] = state["_donor_fd"] = None
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
    the same dataset state (paths, labels, file sizes and mtimes) that covers the samples. A new
    one keeps in its own pack only the original bytes that no other size's cache in `cache_dir`
    (same dataset state) holds already: those rows point into that cache's pack (SHARED).
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

    donor = _find_donor(cache_dir, size, fingerprint)
    identity = [fingerprint, *paths]
    if donor is not None:  # another donor, another layout: another file name
        identity += [donor.pack.data_path.name, donor.pack.index_sha256]
    key = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]
    data_path = cache_dir / f"images-{size}-{key}.pack"
    shared = _write_pack(index.root, paths, size, data_path, donor, progress, workers, max_pixels)
    rows = {path: i for i, path in enumerate(paths)}
    donor_path = donor.pack.data_path if donor is not None and shared else None
    # Opened before the manifest commits it: a concurrent build of this size may unlink the
    # files in its cleanup below, and open descriptors survive that.
    cache = ImageCache(
        data_path,
        rows,
        size,
        fingerprint,
        reused=False,
        max_pixels=max_pixels,
        donor_path=donor_path,
    )
    write_json_atomic(
        manifest_path,
        {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "size": size,
            "fingerprint": fingerprint,
            "data_file": data_path.name,
            "donor": (
                {"data_file": donor.pack.data_path.name, "index_sha256": donor.pack.index_sha256}
                if donor is not None and shared
                else None
            ),
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
    return cache


@dataclass(frozen=True)
class _Pack:
    """A committed cache in the directory whose manifest matches the dataset's state."""

    manifest: dict[str, Any]
    rows: dict[str, int]
    data_path: Path
    entries: np.ndarray
    index_sha256: str


@dataclass(frozen=True)
class _Donor:
    pack: _Pack
    originals: dict[str, tuple[int, int]]  # path -> (offset, length) of its own ORIGINAL rows


def _read_pack(manifest_path: Path, cache_dir: Path, fingerprint: str) -> _Pack | None:
    """The cache a manifest describes, when it is of this format and dataset state and its own
    pack and index are whole (the pack ends where its last own entry does)."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != CACHE_FORMAT
        or manifest.get("version") != CACHE_VERSION
        or manifest.get("fingerprint") != fingerprint
    ):
        return None
    rows = {path: i for i, path in enumerate(manifest.get("paths", []))}
    data_path = cache_dir / str(manifest.get("data_file", ""))
    try:
        index_bytes = _index_path(data_path).read_bytes()
        pack_size = data_path.stat().st_size
    except OSError:
        return None
    if len(index_bytes) != len(rows) * 3 * _INDEX_DTYPE.itemsize:
        return None
    entries = np.frombuffer(index_bytes, dtype=_INDEX_DTYPE).reshape(-1, 3)
    own = entries[entries[:, 2] != SHARED]
    if pack_size != (int((own[:, 0] + own[:, 1]).max()) if len(own) else 0):
        return None
    digest = hashlib.sha256(index_bytes).hexdigest()
    return _Pack(manifest, rows, data_path, entries, digest)


def _open_existing(
    manifest_path: Path,
    cache_dir: Path,
    size: int,
    fingerprint: str,
    paths: list[str],
    max_pixels: int,
) -> ImageCache | None:
    pack = _read_pack(manifest_path, cache_dir, fingerprint)
    if pack is None or pack.manifest.get("size") != size:
        return None
    if not all(p in pack.rows for p in paths):
        return None
    shared = pack.entries[pack.entries[:, 2] == SHARED]
    donor_path = None
    if len(shared):
        # The donor must be the very pack the rows were taken from: same name, same index.
        donor = pack.manifest.get("donor")
        if not isinstance(donor, dict):
            return None
        donor_path = cache_dir / str(donor.get("data_file", ""))
        try:
            donor_index = _index_path(donor_path).read_bytes()
            donor_size = donor_path.stat().st_size
        except OSError:
            return None
        if hashlib.sha256(donor_index).hexdigest() != donor.get("index_sha256"):
            return None
        if donor_size < int((shared[:, 0] + shared[:, 1]).max()):
            return None
    return ImageCache(
        pack.data_path,
        pack.rows,
        size,
        fingerprint,
        reused=True,
        max_pixels=max_pixels,
        donor_path=donor_path,
    )


def _find_donor(cache_dir: Path, size: int, fingerprint: str) -> _Donor | None:
    """The other size's cache of this dataset state with the most original bytes of its own.

    A cache that itself shares rows is never a donor: references stay one hop, and a donor's
    rebuild (same dataset, same samples: same name and layout) never depends on its referrers.
    """
    best: _Donor | None = None
    for manifest_path in sorted(cache_dir.glob("images-*.json")):
        if manifest_path.name == f"images-{size}.json":
            continue
        pack = _read_pack(manifest_path, cache_dir, fingerprint)
        if pack is None or bool((pack.entries[:, 2] == SHARED).any()):
            continue
        paths = pack.manifest["paths"]
        originals = {
            paths[row]: (int(pack.entries[row, 0]), int(pack.entries[row, 1]))
            for row in np.flatnonzero(pack.entries[:, 2] == ORIGINAL)
        }
        if originals and (best is None or len(originals) > len(best.originals)):
            best = _Donor(pack, originals)
    return best


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
    donor: _Donor | None,
    progress: Callable[[int, int], None] | None,
    workers: int | None,
    max_pixels: int,
) -> int:
    """Write the pack and its index; returns how many rows are SHARED from `donor`."""

    def load(relpath: str) -> tuple[int, bytes]:
        try:
            return encode_entry((root / relpath).read_bytes(), size, max_pixels)
        except (ImageError, OSError) as exc:
            raise DatasetError(
                "dataset_changed",
                f"{relpath} no longer decodes ({exc}); index the dataset again",
                {"path": relpath},
            ) from exc

    shared = donor.originals if donor is not None else {}
    entries = np.zeros((len(paths), 3), dtype=_INDEX_DTYPE)
    with atomic_write(data_path) as tmp:
        # No entry is bigger than its file: reserving their sum makes a full disk an error
        # now, before anything is decoded, and the surplus is cut off at the end. A file the
        # donor holds is stored here only as RAW (known from its size) or as a smaller PNG
        # (rare: not reserved; a full disk is still an error when written).
        reserve(tmp, _files_bytes(root, paths, size, shared))
        with open(tmp, "r+b") as out:
            offset = _append_entries(out, load, paths, entries, shared, progress, workers)
            out.truncate(offset)
        # The index before the pack is committed: a manifest is only written after both.
        with atomic_write(_index_path(data_path)) as index_tmp:
            entries.tofile(index_tmp)
    return int((entries[:, 2] == SHARED).sum())


def _files_bytes(
    root: Path, paths: list[str], size: int, shared: Mapping[str, tuple[int, int]]
) -> int:
    total = 0
    for relpath in paths:
        try:
            file_bytes = (root / relpath).stat().st_size
        except OSError as exc:
            raise DatasetError(
                "dataset_changed",
                f"{relpath} is gone ({exc}); index the dataset again",
                {"path": relpath},
            ) from exc
        if relpath not in shared or size * size * 3 <= file_bytes:
            total += file_bytes
    return total


def _append_entries(
    out: BinaryIO,
    load: Callable[[str], tuple[int, bytes]],
    paths: list[str],
    entries: np.ndarray,
    shared: Mapping[str, tuple[int, int]],
    progress: Callable[[int, int], None] | None,
    workers: int | None,
) -> int:
    """Write each path's entry in order, fill `entries`; returns the bytes written.

    An ORIGINAL entry whose bytes the donor already holds (`shared`: path -> offset, length in
    its pack) is not written again but pointed at there; the length check is a guard, the
    matching fingerprints already say the file is the one the donor stored."""
    offset = 0
    results = _ordered_map(load, paths, workers or decode_workers())
    for i, (path, (kind, stored)) in enumerate(zip(paths, results, strict=True)):
        location = shared.get(path) if kind == ORIGINAL else None
        if location is not None and location[1] == len(stored):
            entries[i] = (*location, SHARED)
        else:
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
