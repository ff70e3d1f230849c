"""Index an image-folder dataset (`<class>/<image>`): classes, valid samples, rejected files.

Every file is decoded once with `bitcore.images.decode_image` (magic-byte allow-list, pixel
cap, EXIF orientation), so whatever reaches training is known to decode. Bad files are not
fatal: they are listed in `rejected` with a reason. The median image size is what the
BiT-HyperRule needs to pick the training resolution (Kolesnikov et al. 2020, sec. 3.3).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitcore.atomic import write_json_atomic
from bitcore.cpus import available_cpus  # re-exported: older imports name it here
from bitcore.images import DEFAULT_MAX_PIXELS, ImageError, decode_image

INDEX_FORMAT = "bitserve-dataset-index"
INDEX_VERSION = 1
IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Sample:
    path: str  # posix path relative to DatasetIndex.root
    label: int


@dataclass(frozen=True)
class Rejected:
    path: str  # posix path relative to DatasetIndex.root
    reason: str  # short, machine-friendly: "undecodable", "unsupported_format", "nested", ...
    message: str


class DatasetError(ValueError):
    """The folder cannot be used as a dataset at all; `code` is snake_case for the API."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.details = details or {}


@dataclass
class DatasetIndex:
    root: Path
    classes: list[str]
    samples: list[Sample]
    rejected: list[Rejected] = field(default_factory=list)
    median_size: tuple[int, int] = (0, 0)  # (height, width) of the valid images

    @property
    def num_images(self) -> int:
        return len(self.samples)

    def counts(self) -> dict[str, int]:
        """Valid images per class, in class order."""
        counts = dict.fromkeys(self.classes, 0)
        for sample in self.samples:
            counts[self.classes[sample.label]] += 1
        return counts

    def path_of(self, sample: Sample) -> Path:
        return self.root / sample.path

    def fingerprint(self) -> str:
        """A hash of the samples and their files' size and mtime: changes when the data does."""
        digest = hashlib.sha256()
        digest.update(json.dumps([str(self.root), self.classes]).encode())
        for sample in self.samples:
            try:
                stat = self.path_of(sample).stat()
                state = f"{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:
                state = "missing"
            digest.update(f"\0{sample.path}\0{sample.label}\0{state}".encode())
        return digest.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "root": str(self.root),
            "classes": list(self.classes),
            "samples": [[s.path, s.label] for s in self.samples],
            "rejected": [
                {"path": r.path, "reason": r.reason, "message": r.message} for r in self.rejected
            ],
            "median_size": list(self.median_size),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, root: str | Path | None = None) -> DatasetIndex:
        """The inverse of to_dict; `root` relocates a dataset that was moved as a whole."""
        if data.get("format") != INDEX_FORMAT or data.get("version") != INDEX_VERSION:
            raise ValueError(
                f"not a {INDEX_FORMAT} v{INDEX_VERSION} document "
                f"(format={data.get('format')!r}, version={data.get('version')!r})"
            )
        height, width = data["median_size"]
        return cls(
            root=Path(root if root is not None else data["root"]),
            classes=[str(c) for c in data["classes"]],
            samples=[Sample(str(p), int(label)) for p, label in data["samples"]],
            rejected=[Rejected(r["path"], r["reason"], r["message"]) for r in data["rejected"]],
            median_size=(int(height), int(width)),
        )

    def save(self, path: str | Path) -> None:
        """Write as JSON atomically (`bitcore.atomic`), so readers never see half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.to_dict(), indent=None)  # one line: it lists every sample

    @classmethod
    def load(cls, path: str | Path, *, root: str | Path | None = None) -> DatasetIndex:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle), root=root)


def index_directory(
    root: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_images_per_class: int = 2,
    progress: Progress | None = None,
    workers: int | None = None,
) -> DatasetIndex:
    """Index `root` laid out as `<class>/<image>` (one optional wrapping folder is allowed).

    Raises DatasetError("not_a_directory" | "too_few_classes" | "too_few_images").
    """
    base = _dataset_root(Path(root))
    classes: list[str] = []
    candidates: list[tuple[str, int]] = []
    rejected: list[Rejected] = []
    for entry in _visible_entries(base):
        if entry.is_symlink():
            rejected.append(Rejected(entry.name, "symlink", "symbolic links are not followed"))
        elif entry.is_dir():
            classes.append(entry.name)
        else:
            rejected.append(
                Rejected(entry.name, "wrong_depth", "files must be inside a class folder")
            )
    classes.sort()
    for label, name in enumerate(classes):
        for relpath, problem in _class_files(base, name):
            if problem is None:
                candidates.append((relpath, label))
            else:
                rejected.append(Rejected(relpath, *problem))

    samples, sizes = _decode_all(base, candidates, max_pixels, progress, workers, rejected)
    index = DatasetIndex(
        root=base,
        classes=classes,
        samples=samples,
        rejected=sorted(rejected, key=lambda r: r.path),
        median_size=_median_size(sizes),
    )
    _check_counts(index, min_images_per_class)
    return index


def _dataset_root(root: Path) -> Path:
    if not root.is_dir():
        raise DatasetError("not_a_directory", f"{root} is not a directory")
    entries = list(_visible_entries(root))
    # One wrapping folder (as zipping a folder produces) is descended into, once only. A lone
    # folder of images is a single class instead, so the error names it ("too_few_classes").
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        inner = entries[0]
        if any(e.is_dir() and not e.is_symlink() for e in _visible_entries(inner)):
            return inner
    return root


def _visible_entries(folder: Path) -> Iterator[Path]:
    for entry in sorted(folder.iterdir()):
        if not entry.name.startswith(".") and entry.name not in IGNORED_NAMES:
            yield entry


def _class_files(base: Path, name: str) -> Iterator[tuple[str, tuple[str, str] | None]]:
    """(relative path, None) for candidate images, (relative path, (reason, message)) otherwise."""
    for dirpath, dirnames, filenames in os.walk(base / name):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        folder = Path(dirpath)
        nested = folder != base / name
        for entry in sorted([*filenames, *(d for d in dirnames if (folder / d).is_symlink())]):
            if _hidden(entry):
                continue
            path = folder / entry
            relpath = path.relative_to(base).as_posix()
            if path.is_symlink():
                yield relpath, ("symlink", "symbolic links are not followed")
            elif nested:
                yield relpath, ("nested", "images must sit directly in their class folder")
            elif not path.is_file():
                yield relpath, ("not_a_file", "not a regular file")
            else:
                yield relpath, None
        # os.walk does not descend into symlinked folders (followlinks=False); reported above.
        dirnames[:] = [d for d in dirnames if not (folder / d).is_symlink()]


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def _decode_all(
    base: Path,
    candidates: list[tuple[str, int]],
    max_pixels: int,
    progress: Progress | None,
    workers: int | None,
    rejected: list[Rejected],
) -> tuple[list[Sample], list[tuple[int, int]]]:
    def probe(relpath: str) -> tuple[int, int] | ImageError:
        try:
            image = decode_image(base / relpath, max_pixels=max_pixels)
        except ImageError as exc:
            return exc
        except OSError as exc:  # unreadable file (permissions, vanished)
            return ImageError("unreadable", f"cannot read file: {exc}")
        return image.height, image.width

    samples: list[Sample] = []
    sizes: list[tuple[int, int]] = []
    total = len(candidates)
    # Pillow releases the GIL while decoding, so threads scale without pickling pixels around.
    with ThreadPoolExecutor(max_workers=workers or decode_workers()) as pool:
        results = pool.map(probe, [relpath for relpath, _ in candidates])
        for done, ((relpath, label), result) in enumerate(zip(candidates, results, strict=True)):
            if isinstance(result, ImageError):
                rejected.append(Rejected(relpath, result.reason, str(result)))
            else:
                samples.append(Sample(relpath, label))
                sizes.append(result)
            if progress is not None:
                progress(done + 1, total)
    return samples, sizes


def decode_workers() -> int:
    """Threads for decoding: the CPUs this process may use, capped (I/O and memory bound)."""
    return max(1, min(8, available_cpus()))


def _median_size(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """Median height and median width, each rounded half up (0, 0 for no images)."""
    if not sizes:
        return (0, 0)
    height = statistics.median(h for h, _ in sizes)
    width = statistics.median(w for _, w in sizes)
    return (math.floor(height + 0.5), math.floor(width + 0.5))


def _check_counts(index: DatasetIndex, min_images_per_class: int) -> None:
    if len(index.classes) < 2:
        raise DatasetError(
            "too_few_classes",
            f"need at least 2 class folders, found {len(index.classes)}"
            f"{': ' + ', '.join(index.classes) if index.classes else ''}",
            {"classes": [{"name": n, "count": c} for n, c in index.counts().items()]},
        )
    short = [
        {"name": name, "count": count}
        for name, count in index.counts().items()
        if count < min_images_per_class
    ]
    if short:
        listed = ", ".join(f"{c['name']} ({c['count']})" for c in short)
        raise DatasetError(
            "too_few_images",
            f"each class needs at least {min_images_per_class} valid images; too few in: {listed}",
            {"classes": short, "min_images_per_class": min_images_per_class},
        )
