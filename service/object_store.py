"""The durable copy of datasets and model artifacts: the local directory, or an S3 bucket.

BITSERVE_STORAGE_URL picks the backend (docs/operations.md, "Object storage"):
  unset or file:///...   LocalStore: the artifact root is the store; nothing is copied.
  s3://bucket/prefix     S3Store: the bucket holds every folder; each node's artifact root is
                         only its cache of it (service.storage.Storage.ensure_local).

A folder is published as its files plus a manifest object written LAST (every file's path,
size and SHA-256): a folder is visible only once its manifest exists, so a reader never sees
half an upload. A fetch downloads into a temporary folder beside the target, checks every
size and digest against the manifest, and renames the folder into place: the local folder
is either absent or complete and verified. boto3 reads the standard AWS settings itself
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import urlsplit

from bitcore.atomic import make_private_dir

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_VERSION = 1
# boto3 switches to a multipart upload (parts of this size, several at once) above this.
MULTIPART_BYTES = 64 * 1024 * 1024
HASH_CHUNK_BYTES = 1 << 20


class ObjectStoreError(Exception):
    """The object store could not be read or written (unreachable, refused, ...)."""


class ObjectMissing(ObjectStoreError):
    """No manifest at the key: the folder was never published, or was deleted."""


class ObjectCorrupt(ObjectStoreError):
    """An object differs from its manifest (size or SHA-256), or the manifest is invalid."""


@dataclass(frozen=True)
class ManifestEntry:
    path: str  # posix, relative to the folder
    bytes: int
    sha256: str


@dataclass(frozen=True)
class StoredFolder:
    """A folder of the store, as a listing sees it (service.sweep looks for orphans)."""

    name: str  # under its kind: an id, for every folder bitserve made
    bytes: int  # all its objects, its manifest included
    modified: float  # POSIX time of its newest object: a folder being written is young


class ObjectStore(Protocol):
    is_remote: bool  # False: the local directory is the only copy (never evicted)

    def publish(self, key_prefix: str, local_dir: Path) -> None: ...
    def fetch(self, key_prefix: str, local_dir: Path) -> None: ...
    def read(self, key_prefix: str, name: str, max_bytes: int) -> bytes: ...
    def exists(self, key_prefix: str) -> bool: ...
    def delete(self, key_prefix: str) -> None: ...
    def prune(self, key_prefix: str, keep: Collection[str]) -> None: ...
    def check(self) -> None: ...
    def list_folders(self, kind: str) -> list[StoredFolder]: ...


class LocalStore:
    """The artifact root is the store: publishing and deleting copy nothing."""

    is_remote = False

    def __init__(self, root: Path | None = None) -> None:
        self.root = root  # only listing needs it (service.storage.Storage passes its own)

    def publish(self, key_prefix: str, local_dir: Path) -> None:
        pass

    def fetch(self, key_prefix: str, local_dir: Path) -> None:
        # Only called when local_dir is absent: here that means the folder is gone.
        if not local_dir.is_dir():
            raise ObjectMissing(key_prefix)

    def read(self, key_prefix: str, name: str, max_bytes: int) -> bytes:
        raise ObjectMissing(f"{key_prefix}/{name}")  # the local folder is the only copy

    def exists(self, key_prefix: str) -> bool:
        return False  # Storage asks only for remote stores

    def delete(self, key_prefix: str) -> None:
        pass

    def prune(self, key_prefix: str, keep: Collection[str]) -> None:
        pass

    def check(self) -> None:
        pass

    def list_folders(self, kind: str) -> list[StoredFolder]:
        """The folders under `<root>/<kind>/`, sorted by name; hidden ones (".fetch-...",
        staging) are not folders of the store."""
        if self.root is None:
            raise ObjectStoreError("a local store made without its root cannot be listed")
        parent = self.root / kind
        if not parent.is_dir():
            return []
        folders = []
        for path in sorted(parent.iterdir()):
            if path.name.startswith(".") or path.is_symlink() or not path.is_dir():
                continue
            size, modified = tree_size_and_mtime(path)
            folders.append(StoredFolder(path.name, size, modified))
        return folders


def tree_size_and_mtime(path: Path) -> tuple[int, float]:
    """Bytes of the regular files under `path`, and the newest mtime of it and anything in it
    (a file written a second ago makes the folder a second old). Entries removed while walking
    are skipped."""
    size, modified = 0, 0.0
    for item in (path, *path.rglob("*")):
        try:
            info = item.lstat()
        except FileNotFoundError:
            continue
        modified = max(modified, info.st_mtime)
        if item.is_file() and not item.is_symlink():
            size += info.st_size
    return size, modified


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(local_dir: Path) -> list[ManifestEntry]:
    """Every regular file under `local_dir` (symlinks are never published), sorted by path."""
    entries = []
    for path in sorted(local_dir.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        rel = path.relative_to(local_dir).as_posix()
        entries.append(ManifestEntry(rel, path.stat().st_size, file_sha256(path)))
    return entries


def manifest_bytes(entries: list[ManifestEntry]) -> bytes:
    files = [{"path": e.path, "bytes": e.bytes, "sha256": e.sha256} for e in entries]
    return json.dumps({"version": MANIFEST_VERSION, "files": files}).encode()


def parse_manifest(data: bytes) -> list[ManifestEntry]:
    """The manifest's entries; ObjectCorrupt for anything malformed, including a path that
    would leave the folder (a manifest is data from the bucket, not trusted with paths)."""
    try:
        document = json.loads(data)
        if document.get("version") != MANIFEST_VERSION:
            raise ValueError(f"unknown manifest version {document.get('version')!r}")
        entries = [
            ManifestEntry(str(f["path"]), int(f["bytes"]), str(f["sha256"]))
            for f in document["files"]
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ObjectCorrupt(f"invalid manifest: {exc}") from None
    for entry in entries:
        parts = PurePosixPath(entry.path).parts
        if not parts or entry.path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ObjectCorrupt(f"manifest path {entry.path!r} leaves the folder")
        if entry.bytes < 0 or len(entry.sha256) != 64:
            raise ObjectCorrupt(f"manifest entry {entry.path!r} has no valid size or digest")
    return entries


def verify_file(path: Path, entry: ManifestEntry) -> None:
    size = path.stat().st_size
    if size != entry.bytes:
        raise ObjectCorrupt(f"{entry.path}: {size} bytes, the manifest says {entry.bytes}")
    digest = file_sha256(path)
    if digest != entry.sha256:
        raise ObjectCorrupt(f"{entry.path}: SHA-256 {digest}, the manifest says {entry.sha256}")


class S3Store:
    """A bucket (and key prefix) of an S3-compatible store, through boto3."""

    is_remote = True

    def __init__(
        self, bucket: str, prefix: str = "", multipart_bytes: int = MULTIPART_BYTES
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.multipart_bytes = multipart_bytes  # S3's smallest part is 5 MiB
        self._client: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
        return cls(parts.netloc, parts.path)

    def client(self) -> Any:
        # Made on first use, in the process that uses it (a Celery prefork child must not
        # inherit its parent's connections); boto3 clients are thread-safe once made.
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                # Bounded waits: /readyz and a predict's cache miss must not hang on a dead
                # endpoint for boto3's default minute.
                config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3})
                self._client = boto3.session.Session().client("s3", config=config)
            return self._client

    def _key(self, key_prefix: str, name: str = "") -> str:
        parts = [p for p in (self.prefix, key_prefix.strip("/")) if p]
        base = "/".join(parts)
        return f"{base}/{name}" if name else base

    def _manifest_key(self, key_prefix: str) -> str:
        # Beside the folder, not in it: no file of a folder can be mistaken for it.
        return self._key(key_prefix) + MANIFEST_SUFFIX

    def _transfer(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_bytes, multipart_chunksize=self.multipart_bytes
        )

    def publish(self, key_prefix: str, local_dir: Path) -> None:
        entries = build_manifest(local_dir)
        client, config = self.client(), self._transfer()
        try:
            for entry in entries:
                client.upload_file(
                    str(local_dir / entry.path),
                    self.bucket,
                    self._key(key_prefix, entry.path),
                    Config=config,
                )
            client.put_object(
                Bucket=self.bucket,
                Key=self._manifest_key(key_prefix),
                Body=manifest_bytes(entries),
                ContentType="application/json",
            )
        except Exception as exc:
            raise _store_error(exc, key_prefix) from exc

    def manifest(self, key_prefix: str) -> list[ManifestEntry]:
        try:
            answer = self.client().get_object(
                Bucket=self.bucket, Key=self._manifest_key(key_prefix)
            )
            data = answer["Body"].read()
        except Exception as exc:
            raise _store_error(exc, key_prefix) from exc
        return parse_manifest(data)

    def fetch(self, key_prefix: str, local_dir: Path) -> None:
        """Download the folder to `local_dir` (which must not exist), verified, atomically."""
        entries = self.manifest(key_prefix)
        client, config = self.client(), self._transfer()
        make_private_dir(local_dir.parent)
        staging = Path(tempfile.mkdtemp(prefix=f".fetch-{local_dir.name}-", dir=local_dir.parent))
        try:
            for entry in entries:
                target = staging / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    client.download_file(
                        self.bucket, self._key(key_prefix, entry.path), str(target), Config=config
                    )
                except Exception as exc:
                    error = _store_error(exc, key_prefix)
                    if isinstance(error, ObjectMissing):  # the manifest names a lost object
                        raise ObjectCorrupt(f"{entry.path} is listed but missing") from exc
                    raise error from exc
                verify_file(target, entry)
            try:
                os.rename(staging, local_dir)
            except OSError:
                if not local_dir.is_dir():
                    raise
                # Another thread or process fetched it meanwhile: theirs is as good as ours.
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def read(self, key_prefix: str, name: str, max_bytes: int) -> bytes:
        """One file of a published folder, checked against its manifest (a small file: a
        folder's listing, not its images; ObjectCorrupt past `max_bytes`)."""
        entry = next((e for e in self.manifest(key_prefix) if e.path == name), None)
        if entry is None:
            raise ObjectMissing(f"{key_prefix}/{name}")
        if entry.bytes > max_bytes:
            raise ObjectCorrupt(f"{name}: {entry.bytes} bytes, more than {max_bytes} expected")
        try:
            answer = self.client().get_object(Bucket=self.bucket, Key=self._key(key_prefix, name))
            data: bytes = answer["Body"].read(max_bytes + 1)
        except Exception as exc:
            error = _store_error(exc, key_prefix)
            if isinstance(error, ObjectMissing):
                raise ObjectCorrupt(f"{name} is listed but missing") from exc
            raise error from exc
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != entry.bytes or digest != entry.sha256:
            raise ObjectCorrupt(f"{name}: {len(data)} bytes, SHA-256 {digest}: not the manifest's")
        return data

    def exists(self, key_prefix: str) -> bool:
        try:
            self.client().head_object(Bucket=self.bucket, Key=self._manifest_key(key_prefix))
        except Exception as exc:
            error = _store_error(exc, key_prefix)
            if isinstance(error, ObjectMissing):
                return False
            raise error from exc
        return True

    def delete(self, key_prefix: str) -> None:
        """The manifest first (the folder is gone for readers at once), then its objects."""
        client = self.client()
        try:
            client.delete_object(Bucket=self.bucket, Key=self._manifest_key(key_prefix))
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(key_prefix) + "/"):
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:  # a page holds at most 1000 keys, delete_objects' own limit
                    client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
        except Exception as exc:
            raise _store_error(exc, key_prefix) from exc

    def list_folders(self, kind: str) -> list[StoredFolder]:
        """Every folder under `<prefix>/<kind>/`, sorted by name, from the keys themselves
        (list_objects_v2, 1000 keys a page): `<kind>/<name>/...` and the manifest
        `<kind>/<name>.manifest.json` both belong to `name`, so a folder whose upload died
        before its manifest is listed too, and so is a manifest whose objects are gone."""
        base = self._key(kind) + "/"
        sizes: dict[str, int] = {}
        newest: dict[str, float] = {}
        try:
            paginator = self.client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
                for item in page.get("Contents", []):
                    name = folder_of_key(item["Key"][len(base) :])
                    if name is None:
                        continue
                    sizes[name] = sizes.get(name, 0) + int(item["Size"])
                    stamp = item["LastModified"].timestamp()
                    newest[name] = max(newest.get(name, 0.0), stamp)
        except Exception as exc:
            raise _store_error(exc, kind) from exc
        return [StoredFolder(name, sizes[name], newest[name]) for name in sorted(sizes)]

    def prune(self, key_prefix: str, keep: Collection[str]) -> None:
        """Delete the folder's objects whose paths are not in `keep`: what a republished
        folder (a job's newer checkpoint, in new step-named files) no longer lists. Called
        after the new manifest is written, so a reader never loses a file it lists."""
        client, base = self.client(), self._key(key_prefix) + "/"
        try:
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
                stale = [
                    {"Key": item["Key"]}
                    for item in page.get("Contents", [])
                    if item["Key"][len(base) :] not in keep
                ]
                if stale:
                    client.delete_objects(Bucket=self.bucket, Delete={"Objects": stale})
        except Exception as exc:
            raise _store_error(exc, key_prefix) from exc

    def check(self) -> None:
        """Raise unless the bucket answers (readiness)."""
        try:
            self.client().head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise _store_error(exc, self.bucket) from exc


def folder_of_key(rest: str) -> str | None:
    """The folder a key belongs to, from its part after `<prefix>/<kind>/`: "x/a/b" and
    "x.manifest.json" are folder x's; a bare "x" (no bitserve key looks so) is none."""
    if "/" in rest:
        name = rest.split("/", 1)[0]
        return name or None
    if rest.endswith(MANIFEST_SUFFIX) and len(rest) > len(MANIFEST_SUFFIX):
        return rest[: -len(MANIFEST_SUFFIX)]
    return None


def _store_error(exc: Exception, key_prefix: str) -> ObjectStoreError:
    if isinstance(exc, ObjectStoreError):
        return exc
    code = ""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    if code in ("NoSuchKey", "404", "NotFound"):
        return ObjectMissing(key_prefix)
    return ObjectStoreError(f"object store: {type(exc).__name__}: {exc}")


def open_store(url: str | None, root: Path | None = None) -> LocalStore | S3Store:
    """The store BITSERVE_STORAGE_URL names (unset: the local directory `root`)."""
    if not url or url.startswith("file://"):
        return LocalStore(root)
    if url.startswith("s3://"):
        return S3Store.from_url(url)
    raise ValueError(f"unsupported storage URL {url!r}: use s3://bucket/prefix or file:///path")
