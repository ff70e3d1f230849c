"""Where files live: server-generated paths under one root, never a path a client chose.

Layout (relative "storage keys" are what the database stores):
  uploads/<ds_id>/    archive.zip | archive.tar.gz: an upload waiting for its ingest worker
  datasets/<ds_id>/   files/ (extracted images), index.json, rejected.json, cache/ (built by
                      the node that trains)
  jobs/<job_id>/      the training work dir (checkpoints, caches)
  models/<mdl_id>/    a bitcore artifact (model.safetensors + metadata.json)
  batch_predictions/<bp_id>/  predictions.csv | .jsonl once done; shards/shard-NNNNN/ (one
                      rows file each) while it runs, each published on its own
  tmp/                uploads in flight

With an object store (BITSERVE_STORAGE_URL=s3://..., service.object_store) uploads/, datasets/
and models/ folders are published to it under the same keys, and this root is the node's cache:
`ensure_local` fetches a folder that is not here. Of jobs/<job_id>/ only the latest training
checkpoint travels (`jobs/<job_id>` in the store: its step-NNNNNNNN/ folder, see
worker.checkpoints), so a job resumes on any node; tmp/ stays local.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from bitcore.atomic import is_disk_full, make_private_dir
from service import local_cache
from service.domain_errors import InsufficientStorage, Unavailable
from service.ids import is_id
from service.object_store import LocalStore, ObjectStore, ObjectStoreError, open_store

if TYPE_CHECKING:
    from service.settings import Settings

# A dataset's folder (service.datasets writes it, the worker trains from it).
DATASET_FILES = "files"  # the extracted upload
DATASET_INDEX = "index.json"  # bitcore.data.index.DatasetIndex
DATASET_CACHE = "cache"  # images resized once to the HyperRule pre-crop size


log = logging.getLogger(__name__)

# The folders that travel through the object store, by kind: the id prefix each must have.
SHARED_KINDS = {
    "uploads": "ds",
    "datasets": "ds",
    "models": "mdl",
    "evaluations": "eval",
    "batch_predictions": "bp",
}
# The largest file read_shared reads into memory (a rejected list of 1M members is ~80 MB).
READ_SHARED_MAX_BYTES = 256 << 20
UPLOAD_NAMES = {"zip": "archive.zip", "tar.gz": "archive.tar.gz"}  # by archive kind


class Storage:
    def __init__(
        self,
        root: str | Path,
        objects: ObjectStore | None = None,
        *,
        cache_max_bytes: int | None = None,
        cache_min_idle_seconds: float = local_cache.MIN_IDLE_SECONDS,
    ) -> None:
        self.root = Path(root).resolve()
        if objects is None or (isinstance(objects, LocalStore) and objects.root is None):
            objects = LocalStore(self.root)  # the local store is this root, whoever made it
        self.objects: ObjectStore = objects
        # With a remote store, the root is a cache of it: held under this many bytes.
        self.cache_max_bytes = cache_max_bytes
        self.cache_min_idle_seconds = cache_min_idle_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> Storage:
        return cls(
            settings.artifact_root,
            open_store(settings.storage_url, settings.artifact_root),
            cache_max_bytes=settings.cache_max_bytes,
        )

    def shared_dir(self, kind: str, object_id: str) -> Path:
        """The local folder of a dataset or model (kind "datasets" or "models")."""
        return self._dir(kind, SHARED_KINDS[kind], object_id)

    def ensure_local(self, kind: str, object_id: str) -> Path:
        """The folder, fetched from the object store first if this node has no copy.
        Raises service.object_store.ObjectMissing (not in the store either), ObjectCorrupt (a
        file differs from the manifest: nothing is kept) or ObjectStoreError (unreachable)."""
        directory = self.shared_dir(kind, object_id)
        if not directory.is_dir():
            # A fetched folder appears whole (renamed into place), never half-written.
            self.objects.fetch(f"{kind}/{object_id}", directory)
            if self.cache_max_bytes is not None:
                local_cache.evict(
                    self.root,
                    self.objects,
                    tuple(SHARED_KINDS),
                    self.cache_max_bytes,
                    keep=directory,
                    min_idle_seconds=self.cache_min_idle_seconds,
                )
        local_cache.touch(directory)  # used now: the last to be evicted
        return directory

    def touch(self, kind: str, object_id: str) -> None:
        """Mark a cached folder as in use (a training job's heartbeat keeps its dataset's
        folder from being evicted under it)."""
        local_cache.touch(self.shared_dir(kind, object_id))

    def publish(self, kind: str, object_id: str) -> None:
        """Copy the finished folder to the object store (a no-op for the local store)."""
        self.objects.publish(f"{kind}/{object_id}", self.shared_dir(kind, object_id))

    @property
    def remote(self) -> bool:
        """True when folders live in an object store, this root being only a cache of it."""
        return self.objects.is_remote

    def store_upload(self, dataset_id: str, archive: Path, kind: str) -> None:
        """Move a received archive (a file under upload_tmp(): same disk, so a rename) into
        uploads/<dataset_id>/ and publish it; with an object store the local copy then goes
        (the gateway keeps nothing: a worker on any node fetches it)."""
        directory = self.shared_dir("uploads", dataset_id)
        directory.mkdir(parents=True)
        os.replace(archive, directory / UPLOAD_NAMES[kind])
        self.publish("uploads", dataset_id)
        if self.remote:
            self.remove(directory)

    def upload_archive(self, dataset_id: str, kind: str) -> Path:
        """The uploaded archive of a dataset being ingested, fetched here if need be (the
        errors of ensure_local)."""
        return self.ensure_local("uploads", dataset_id) / UPLOAD_NAMES[kind]

    def read_shared(self, kind: str, object_id: str, name: str) -> bytes:
        """One small file of a shared folder straight from the object store (this node need
        not fetch the whole folder); the errors of ObjectStore.read."""
        self.shared_dir(kind, object_id)  # the id is checked before it becomes a key
        return self.objects.read(f"{kind}/{object_id}", name, READ_SHARED_MAX_BYTES)

    def discard(self, kind: str, object_id: str) -> None:
        """Delete the folder here and in the object store. Called once its row is gone (or was
        never written): objects the store fails to delete are orphans nobody can reach, logged
        rather than raised, so a delete that the database has committed still succeeds."""
        self.remove(self.shared_dir(kind, object_id))
        try:
            self.objects.delete(f"{kind}/{object_id}")
        except ObjectStoreError as exc:
            log.warning("%s/%s: objects left in the object store: %s", kind, object_id, exc)

    def publish_checkpoint(self, job_id: str, folder: Path) -> None:
        """Make `folder` (a job's latest step-NNNNNNNN/ checkpoint folder, nothing else) the
        job's checkpoint in the object store, then delete the objects of the one it replaces
        (their step-named paths differ, so the old manifest stays whole until the new one is
        written). A no-op for the local store."""
        key = self._job_key(job_id)
        self.objects.publish(key, folder)
        keep = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        self.objects.prune(key, keep)

    def fetch_checkpoint(self, job_id: str, target: Path) -> None:
        """Download the job's published checkpoint into `target` (which must not exist),
        verified. Raises ObjectMissing (none published), ObjectCorrupt or ObjectStoreError."""
        self.objects.fetch(self._job_key(job_id), target)

    def discard_job(self, job_id: str) -> None:
        """A job ended: delete its work dir here and its checkpoint in the object store. A
        delete the store refuses leaves orphans, logged, never raised (the job has ended)."""
        self.remove(self.job_dir(job_id))
        if not self.objects.is_remote:
            return
        try:
            self.objects.delete(self._job_key(job_id))
        except ObjectStoreError as exc:
            log.warning("jobs/%s: checkpoint objects left in the object store: %s", job_id, exc)

    def _job_key(self, job_id: str) -> str:
        self.job_dir(job_id)  # refuses anything but our own job id format
        return f"jobs/{job_id}"

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
        self.objects.check()  # S3: the bucket answers (head_bucket)


# The object store did not answer (service.object_store): clients retry after this long.
STORAGE_RETRY_AFTER_S = 5


def storage_unavailable(advice: str) -> Unavailable:
    """The answer when the object store did not answer; `advice` says what to do next."""
    return Unavailable(
        "storage_unavailable",
        f"the server's object store did not answer; {advice}",
        retry_after=STORAGE_RETRY_AFTER_S,
    )


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
