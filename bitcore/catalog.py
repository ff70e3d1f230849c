"""The catalog of public BiT checkpoints and a resumable, verified downloader for them.

Base checkpoints come only from this catalog (by name), never from a user-supplied URL or path:
fetching arbitrary URLs on a user's behalf is the bug class of TorchServe's CVE-2023-43654
(docs/operations.md). Operators may point the same names at a mirror with
BITSERVE_CHECKPOINT_BASE_URL (or `base_url=`), e.g. for machines without internet.

Downloads stream to `<name>.npz.part`, resume it with an HTTP Range request, check the size the
server announced, check that the result is an .npz of `resnet/` arrays, and only then rename it
into place, so `<name>.npz` present means complete. A per-file lock keeps concurrent workers
from writing the same .part.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from bitcore.atomic import commit_file
from bitcore.checkpoints import is_npz
from bitcore.models import (
    IMAGENET1K_CLASSES,
    IMAGENET21K_CLASSES,
    PUBLISHED_SIZES,
    count_parameters,
)

try:  # POSIX advisory locks; elsewhere concurrent pulls of one file are the caller's problem.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

DEFAULT_BASE_URL = "https://storage.googleapis.com/bit_models"
DIR_ENV = "BITSERVE_CHECKPOINT_DIR"
BASE_URL_ENV = "BITSERVE_CHECKPOINT_BASE_URL"
DEFAULT_TIMEOUT = 60.0
CHUNK = 1 << 20

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # file stem on the server, e.g. "BiT-M-R50x1" -> BiT-M-R50x1.npz
    model_name: str  # registry architecture to build (bitcore.models.create_model)
    num_classes: int  # classes of the checkpoint's head
    upstream: str  # data the weights were trained on

    @property
    def filename(self) -> str:
        return f"{self.name}.npz"

    @property
    def parameters(self) -> int:
        return count_parameters(self.model_name, self.num_classes)

    @property
    def approx_bytes(self) -> int:
        """float32 arrays, 4 bytes per parameter; npz headers add well under 0.1%."""
        return 4 * self.parameters

    @property
    def size_bytes(self) -> int:
        """Alias of approx_bytes (the download size to show users)."""
        return self.approx_bytes

    def url(self, base_url: str | None = None) -> str:
        return f"{resolve_base_url(base_url)}/{self.filename}"


def _build_catalog() -> dict[str, CatalogEntry]:
    entries: dict[str, CatalogEntry] = {}
    for size in PUBLISHED_SIZES:
        for family, classes, upstream in (
            ("BiT-S", IMAGENET1K_CLASSES, "ImageNet-1k (ILSVRC-2012)"),
            ("BiT-M", IMAGENET21K_CLASSES, "ImageNet-21k"),
        ):
            name = f"{family}-{size}"
            entries[name] = CatalogEntry(name, name, classes, upstream)
        # BiT-M fine-tuned on ILSVRC-2012 (reference README): a 1000-class head.
        name = f"BiT-M-{size}-ILSVRC2012"
        entries[name] = CatalogEntry(
            name, f"BiT-M-{size}", IMAGENET1K_CLASSES, "ImageNet-21k, fine-tuned on ImageNet-1k"
        )
    return entries


CATALOG: dict[str, CatalogEntry] = _build_catalog()


class CatalogError(Exception):
    """Base of every error this module raises (unknown name, missing file, failed download)."""


class UnknownCheckpoint(CatalogError, ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown checkpoint {name!r}; the catalog has: {', '.join(CATALOG)}")
        self.name = name


class CheckpointMissing(CatalogError, FileNotFoundError):
    """The checkpoint is not on disk and may not (or could not) be downloaded."""

    def __init__(self, name: str, path: Path, url: str, reason: str) -> None:
        super().__init__(
            f"checkpoint {name} is not available ({reason}). Download {url} and save it as "
            f"{path.name} in the directory {path.parent} (i.e. {path}), or set {DIR_ENV} to "
            f"the directory that holds it."
        )
        self.name, self.path, self.url = name, path, url


class CheckpointDownloadError(CatalogError, RuntimeError):
    """A download failed; `CheckpointNetworkError` / `CheckpointHTTPError` say how."""


DownloadError = CheckpointDownloadError


class CheckpointNetworkError(CheckpointDownloadError):
    """The server could not be reached or the connection broke (retrying resumes)."""


class CheckpointHTTPError(CheckpointDownloadError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def get_entry(name: str) -> CatalogEntry:
    try:
        return CATALOG[name]
    except KeyError:
        raise UnknownCheckpoint(name) from None


def checkpoint_dir() -> Path:
    """$BITSERVE_CHECKPOINT_DIR, else ~/.cache/bitserve/checkpoints."""
    configured = os.environ.get(DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "bitserve" / "checkpoints"


def resolve_base_url(base_url: str | None = None) -> str:
    base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    parsed = urlparse(base)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"checkpoint base URL must be http(s)://host/..., got {base!r}")
    return base.rstrip("/")


def local_path(name: str, directory: str | Path | None = None) -> Path:
    entry = get_entry(name)
    return Path(directory if directory is not None else checkpoint_dir()) / entry.filename


def is_present(name: str, directory: str | Path | None = None) -> bool:
    return local_path(name, directory).is_file()


def pull(
    name: str,
    directory: str | Path | None = None,
    *,
    progress: Progress | None = None,
    allow_download: bool = True,
    base_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Return the local path of catalog checkpoint `name`, downloading it if needed.

    `progress(bytes_done, total_or_None)` is called as data arrives. Raises UnknownCheckpoint
    (not a catalog name), CheckpointMissing (absent and allow_download=False),
    CheckpointNetworkError (unreachable or cut off; a rerun resumes the .part),
    CheckpointHTTPError (the server answered an error status) or CheckpointDownloadError (the
    bytes are not the announced size or not a BiT .npz; the .part is removed). All of them are
    CatalogError.
    """
    entry = get_entry(name)
    path = local_path(name, directory)
    if path.is_file():
        return path
    url = entry.url(base_url)
    if not allow_download:
        raise CheckpointMissing(name, path, url, "downloads are disabled")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path):
        if path.is_file():  # another process finished it while we waited for the lock
            return path
        # Not atomic_write: its temporary file has a random name and is removed on any error,
        # but a broken download must survive under a name the next pull can find and resume.
        part = path.with_name(path.name + ".part")
        _download(url, part, progress, timeout)
        _verify_npz(part, url)
        commit_file(part, path)  # fsync, mode 0o644, rename: the same finish as atomic_write
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield  # the lock file stays: removing it would race with a waiting process


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _download(url: str, part: Path, progress: Progress | None, timeout: float) -> None:
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "bitserve"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    manual = f"or download {url} yourself and save it as {part.with_suffix('')}"
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()  # an HTTPError holds the response's open connection
        if exc.code == 416 and offset:
            # Range past the end: the .part is complete already, or longer than the file.
            size = exc.headers.get("Content-Range", "").rpartition("/")[2]
            if size.isdigit() and int(size) == offset:
                return
            part.unlink()
            raise CheckpointDownloadError(
                f"{part} did not fit the file at {url} (HTTP 416); it was removed, retry"
            ) from exc
        raise CheckpointHTTPError(f"HTTP {exc.code} {exc.reason} for {url}", exc.code) from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or repr(exc)
        raise CheckpointNetworkError(
            f"network failure fetching {url}: {reason}. Check connectivity, set "
            f"{BASE_URL_ENV} to a reachable mirror, {manual}"
        ) from exc

    with response:
        total = _expected_total(response, offset, url)
        if response.status == 200:
            offset = 0  # the server ignored Range: start over
        done = offset
        with open(part, "ab" if offset else "wb") as fh:
            if progress is not None:
                progress(done, total)
            try:
                while chunk := response.read(CHUNK):
                    fh.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                # Keep what arrived: the next pull resumes it with a Range request.
                raise CheckpointNetworkError(
                    f"connection to {url} broke after {done} bytes ({exc!r}); {part.name} was "
                    f"kept and the next pull resumes it, {manual}"
                ) from exc
    if total is not None and done < total:
        # The server closed early without an error (http.client does not raise for this).
        raise CheckpointNetworkError(
            f"connection to {url} closed after {done} of {total} bytes; {part.name} was kept "
            f"and the next pull resumes it, {manual}"
        )
    if total is not None and done > total:
        part.unlink()
        raise CheckpointDownloadError(
            f"{url}: have {done} bytes, more than the {total} the server announced; "
            f"the partial file was removed"
        )


def _expected_total(response: http.client.HTTPResponse, offset: int, url: str) -> int | None:
    """Size of the whole file as the server announces it (None if it does not say)."""
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
        if match is None or int(match.group(1)) != offset:
            raise CheckpointHTTPError(
                f"{url} answered a resume with a bad Content-Range "
                f"{response.headers.get('Content-Range')!r} (asked for bytes {offset}-)",
                206,
            )
        return int(match.group(3)) if match.group(3) != "*" else None
    if response.status != 200:
        raise CheckpointHTTPError(f"HTTP {response.status} for {url}", response.status)
    length = response.headers.get("Content-Length")
    return int(length) if length is not None and length.isdigit() else None


def _verify_npz(part: Path, url: str) -> None:
    try:
        if not is_npz(part):
            raise ValueError("not a zip archive")
        with np.load(part, allow_pickle=False) as npz:
            keys = list(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        part.unlink()
        raise CheckpointDownloadError(f"{url} is not an .npz file ({exc}); removed it") from exc
    if not keys or not all(k.startswith("resnet/") for k in keys):
        part.unlink()
        raise CheckpointDownloadError(
            f"{url} is an .npz but not a BiT checkpoint (keys {keys[:3]})"
        )


def tqdm_progress(desc: str) -> tuple[Progress, Callable[[], None]]:
    """A progress callback drawing a tqdm bar, and the function that closes the bar."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024)

    def update(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


def pull_with_progress_bar(
    name: str,
    directory: str | Path | None = None,
    *,
    allow_download: bool = True,
    base_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """`pull` with a tqdm bar on stderr (for command-line use)."""
    update, close = tqdm_progress(name)
    try:
        return pull(
            name,
            directory,
            progress=update,
            allow_download=allow_download,
            base_url=base_url,
            timeout=timeout,
        )
    finally:
        close()
