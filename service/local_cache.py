"""A node's cache of the object store, held under a size cap (BITSERVE_CACHE_MAX_BYTES).

With an object store the dataset and model folders under the artifact root are copies: after
each fetch, the least recently used ones are removed until the folders fit the cap. A folder is
"used" when its mtime is touched (Storage.ensure_local, and a training job's heartbeat for its
dataset). Never removed: the folder just fetched, one used within `min_idle_seconds` (a job or
an artifact download may be reading it), and one the store has no manifest for (not yet
published: an upload being built, a model being trained). With the local store nothing is
ever removed: the root is then the only copy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from service.object_store import ObjectStore, ObjectStoreError

log = logging.getLogger(__name__)

# Longer than a training job's heartbeat and a typical artifact download.
MIN_IDLE_SECONDS = 600.0


@dataclass(frozen=True)
class CachedFolder:
    kind: str
    path: Path
    used_at: float
    bytes: int


def touch(path: Path) -> None:
    """Mark a folder as used now (a folder removed meanwhile is fine)."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(path)


def folder_bytes(path: Path) -> int:
    total = 0
    for item in path.rglob("*"):
        try:
            if item.is_file() and not item.is_symlink():
                total += item.stat().st_size
        except FileNotFoundError:  # removed while we walked
            continue
    return total


def cached_folders(root: Path, kinds: tuple[str, ...]) -> list[CachedFolder]:
    """The dataset and model folders under `root`, least recently used first (staging folders
    of fetches in progress start with "." and are skipped)."""
    folders = []
    for kind in kinds:
        parent = root / kind
        if not parent.is_dir():
            continue
        for path in parent.iterdir():
            if path.name.startswith(".") or path.is_symlink() or not path.is_dir():
                continue
            try:
                used_at = path.stat().st_mtime
            except FileNotFoundError:
                continue
            folders.append(CachedFolder(kind, path, used_at, folder_bytes(path)))
    return sorted(folders, key=lambda folder: folder.used_at)


def evict(
    root: Path,
    objects: ObjectStore,
    kinds: tuple[str, ...],
    max_bytes: int,
    keep: Path,
    min_idle_seconds: float = MIN_IDLE_SECONDS,
) -> list[Path]:
    """Remove least recently used folders until the cache fits `max_bytes`; returns those
    removed. It may stay above the cap when everything left is protected (see the module)."""
    if not getattr(objects, "is_remote", False):
        return []
    folders = cached_folders(root, kinds)
    total = sum(folder.bytes for folder in folders)
    removed: list[Path] = []
    now = time.time()
    for folder in folders:
        if total <= max_bytes:
            break
        if folder.path == keep or now - folder.used_at < min_idle_seconds:
            continue
        try:
            if not objects.exists(f"{folder.kind}/{folder.path.name}"):
                continue  # the only copy: not published yet (or its publish failed)
        except ObjectStoreError as exc:
            log.warning("cache eviction stopped: the object store did not answer: %s", exc)
            break
        shutil.rmtree(folder.path, ignore_errors=True)
        total -= folder.bytes
        removed.append(folder.path)
        log.info("evicted %s (%d bytes) from the local cache", folder.path, folder.bytes)
    return removed
