"""Where files live: server-generated paths under one root, never a path a client chose.

Layout (relative "storage keys" are what the database stores):
  datasets/<ds_id>/   files/ (extracted images), index.json, cache/ (resized copies)
  jobs/<job_id>/      the training work dir (checkpoints, caches)
  models/<mdl_id>/    a bitcore artifact (model.safetensors + metadata.json)
  tmp/                uploads in flight
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bitcore.atomic import is_disk_full, make_private_dir
from service.domain_errors import InsufficientStorage
from service.ids import is_id

# A dataset's folder (service.datasets writes it, the worker trains from it).
DATASET_FILES = "files"  # the extracted upload
DATASET_INDEX = "index.json"  # bitcore.data.index.DatasetIndex
DATASET_CACHE = "cache"  # images resized once to the HyperRule pre-crop size


class Storage:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def _dir(self, kind: str, prefix: str, object_id: str) -> Path:
        # The id becomes a path part: accept only our own id format (no "..", no "/").
        if not is_id(object_id, prefix):
            raise ValueError(f"not a valid {prefix} id: {object_id!r}")
        return self.root / kind / object_id

    def dataset_dir(self, dataset_id: str) -> Path:
        return self._dir("datasets", "ds", dataset_id)

    def dataset_index(self, dataset_id: str) -> Path:
        return self.dataset_dir(dataset_id) / DATASET_INDEX

    def dataset_cache(self, dataset_id: str) -> Path:
        return self.dataset_dir(dataset_id) / DATASET_CACHE

    def job_dir(self, job_id: str) -> Path:
        return self._dir("jobs", "job", job_id)

    def model_dir(self, model_id: str) -> Path:
        return self._dir("models", "mdl", model_id)

    def upload_tmp(self) -> Path:
        """The folder for uploads in flight (created on demand)."""
        return make_private_dir(self.root / "tmp")

    def key(self, path: Path) -> str:
        """The storage key (posix path relative to the root) of a path inside the store."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def path(self, key: str) -> Path:
        """The path of a storage key; refuses keys that would leave the root."""
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"storage key {key!r} is outside the store")
        return path

    def remove(self, path: Path) -> None:
        """Delete a file or tree inside the store (missing is fine)."""
        path = Path(path)
        if not path.resolve().is_relative_to(self.root) or path.resolve() == self.root:
            raise ValueError(f"{path} is not inside the store")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise OSError unless a file can be created, written and removed under the root.
        A new root (and any missing parent, e.g. BITSERVE_HOME) is made 0o700: users' data."""
        make_private_dir(self.root)
        fd, name = tempfile.mkstemp(prefix=".ready-", dir=self.root)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)


def disk_full_error(what: str) -> InsufficientStorage:
    """The answer when `what` could not be written because the store's disk is full."""
    return InsufficientStorage(
        "insufficient_storage",
        f"the server's disk is full: {what} could not be stored, and nothing of it was kept. "
        "Try again once the server's operator has freed space.",
    )


@contextmanager
def disk_full_as(what: str) -> Iterator[None]:
    """Turn a full disk (ENOSPC/EDQUOT, however a writer reports it) into InsufficientStorage.
    The block must clean up its own partial files (it does: temp files and folders are removed
    by the code that made them)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not is_disk_full(exc):
            raise
        raise disk_full_error(what) from exc
