"""The catalog of public BiT checkpoints and a resumable, verified downloader for them.

Base checkpoints come only from this catalog (by name), never from a user-supplied URL or path:
fetching arbitrary URLs on a user's behalf is the bug class of TorchServe's CVE-2023-43654
(docs/operations.md). Operators may point the same names at a mirror with
BITSERVE_CHECKPOINT_BASE_URL (or `base_url=`), e.g. for machines without internet.

Downloads stream to `<name>.npz.part`, resume it with an HTTP Range request, check the size the
server announced, check that the result is an .npz of `resnet/` arrays, and only then rename it
into place, so `<name>.npz` present means complete. A per-file lock keeps concurrent workers
from writing the same .part.

Integrity (docs/security.md, "Checkpoints"): https only, unless an operator explicitly allows a
plain-http mirror (BITSERVE_ALLOW_INSECURE_MIRROR); a redirect to http is refused either way
once the transfer is on https; a download larger than BITSERVE_CHECKPOINT_MAX_BYTES is aborted
and its partial file removed; and each file's SHA-256 is recorded on first download and checked
on every use, against a pinned digest where one is known (bitcore.checkpoint_digests).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from bitcore import checkpoint_digests
from bitcore.atomic import commit_file, make_private_dir
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
INSECURE_ENV = "BITSERVE_ALLOW_INSECURE_MIRROR"
MAX_BYTES_ENV = "BITSERVE_CHECKPOINT_MAX_BYTES"
# The largest official file, BiT-M-R152x4.npz, is 4.1 GiB (4 bytes x 1.1e9 parameters): 6 GiB
# leaves room for npz overhead and a little more, and stops an endless or hostile stream.
DEFAULT_MAX_BYTES = 6 << 30
DEFAULT_TIMEOUT = 60.0
CHUNK = 1 << 20

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # file stem on the server, e.g. "BiT-M-R50x1" -> BiT-M-R50x1.npz
    model_name: str  # registry architecture to build (bitcore.models.create_model)
    num_classes: int  # classes of the checkpoint's head
    upstream: str  # data the weights were trained on
    # The file's SHA-256 where it is known. Google publishes none and this project cannot fetch
    # the files, so every entry starts without one: the digest is recorded on first download
    # (bitcore.checkpoint_digests) and operators pin known ones in BITSERVE_CHECKPOINT_SHA256.
    sha256: str | None = None

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

    def url(self, base_url: str | None = None, *, allow_insecure: bool | None = None) -> str:
        return f"{resolve_base_url(base_url, allow_insecure=allow_insecure)}/{self.filename}"


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


class InsecureMirror(CatalogError, ValueError):
    """A plain-http mirror (or a redirect to http) without the operator's explicit consent."""


class CheckpointRedirectRefused(CheckpointDownloadError):
    """The server redirected a download to a URL that is not https (a downgrade)."""


class CheckpointTooLarge(CheckpointDownloadError):
    """The download is (or announced) more bytes than the cap; the partial file was removed."""


class CheckpointCorrupt(CatalogError):
    """The file on disk differs from its pinned or recorded SHA-256 (modified or replaced)."""


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


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def insecure_allowed(allow_insecure: bool | None = None) -> bool:
    """`allow_insecure`, else $BITSERVE_ALLOW_INSECURE_MIRROR (off unless set to 1/true/yes)."""
    return _env_flag(INSECURE_ENV) if allow_insecure is None else allow_insecure


def max_download_bytes(max_bytes: int | None = None) -> int:
    """`max_bytes`, else $BITSERVE_CHECKPOINT_MAX_BYTES, else DEFAULT_MAX_BYTES."""
    if max_bytes is not None:
        return max_bytes
    configured = os.environ.get(MAX_BYTES_ENV, "").strip()
    return int(configured) if configured else DEFAULT_MAX_BYTES


def resolve_base_url(base_url: str | None = None, *, allow_insecure: bool | None = None) -> str:
    base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    parsed = urlparse(base)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"checkpoint base URL must be http(s)://host/..., got {base!r}")
    if parsed.scheme == "http" and not insecure_allowed(allow_insecure):
        # Plain http lets anyone on the path swap the weights a model is trained from.
        raise InsecureMirror(
            f"checkpoint base URL {base!r} is plain http: use https, or set {INSECURE_ENV}=1 "
            "to allow an unencrypted mirror you trust (e.g. on a private network)"
        )
    return base.rstrip("/")


def pinned_digest(name: str, pins: Mapping[str, str] | None = None) -> str | None:
    """The SHA-256 `name` must have: the operator's pin (`pins`, else the environment's), else
    the catalog's own, else None (the digest recorded on first download is checked instead)."""
    effective = checkpoint_digests.pins_from_env() if pins is None else pins
    return effective.get(name) or get_entry(name).sha256


def verify_present(name: str, path: Path, pins: Mapping[str, str] | None = None) -> Path:
    """Check the file of `name` at `path` against its digest; raises CheckpointCorrupt."""
    try:
        checkpoint_digests.verify(path, pinned_digest(name, pins))
    except checkpoint_digests.DigestMismatch as exc:
        raise CheckpointCorrupt(f"checkpoint {name} is corrupt: {exc}") from None
    return path


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
    pins: Mapping[str, str] | None = None,
    max_bytes: int | None = None,
    allow_insecure: bool | None = None,
) -> Path:
    """Return the local path of catalog checkpoint `name`, downloading it if needed.

    `progress(bytes_done, total_or_None)` is called as data arrives. `pins` (name -> SHA-256),
    `max_bytes` and `allow_insecure` default to BITSERVE_CHECKPOINT_SHA256,
    BITSERVE_CHECKPOINT_MAX_BYTES and BITSERVE_ALLOW_INSECURE_MIRROR. Raises UnknownCheckpoint
    (not a catalog name), CheckpointMissing (absent and allow_download=False), InsecureMirror
    (an http mirror not allowed), CheckpointCorrupt (the file's SHA-256 differs from its pinned
    or recorded one), CheckpointNetworkError (unreachable or cut off; a rerun resumes the
    .part), CheckpointHTTPError (the server answered an error status), CheckpointRedirectRefused
    (redirected to http), CheckpointTooLarge (past the cap) or CheckpointDownloadError (the
    bytes are not the announced size or not a BiT .npz; the .part is removed). All of them are
    CatalogError.
    """
    entry = get_entry(name)
    path = local_path(name, directory)
    if path.is_file():
        return verify_present(name, path, pins)
    url = entry.url(base_url, allow_insecure=allow_insecure)
    if not allow_download:
        raise CheckpointMissing(name, path, url, "downloads are disabled")
    make_private_dir(path.parent)
    with _file_lock(path):
        if path.is_file():  # another process finished it while we waited for the lock
            return verify_present(name, path, pins)
        # Not atomic_write: its temporary file has a random name and is removed on any error,
        # but a broken download must survive under a name the next pull can find and resume.
        part = path.with_name(path.name + ".part")
        limit = max_download_bytes(max_bytes)
        _download(url, part, progress, timeout, limit, insecure_allowed(allow_insecure))
        _verify_npz(part, url)
        digest = checkpoint_digests.sha256_of(part)
        pinned = pinned_digest(name, pins)
        if pinned is not None and digest != pinned:
            part.unlink()
            raise CheckpointCorrupt(
                f"{url} has SHA-256 {digest}, not the {pinned} pinned for {name} in "
                f"{checkpoint_digests.PINS_ENV}; the download was removed"
            )
        commit_file(part, path)  # fsync, mode FILE_MODE, rename: the same finish as atomic_write
        checkpoint_digests.record(path, digest)  # checked on every later use
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield  # the lock file stays: removing it would race with a waiting process


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _NoDowngradeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to https, or from http to http when plain http is allowed: an
    https download redirected to http would lose its integrity to anyone on the path."""

    def __init__(self, allow_insecure: bool) -> None:
        self.allow_insecure = allow_insecure

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        source, target = urlparse(req.full_url).scheme, urlparse(newurl).scheme
        if target != "https" and not (self.allow_insecure and source == target == "http"):
            fp.close()
            raise CheckpointRedirectRefused(
                f"{req.full_url} redirected (HTTP {code}) to {newurl}, which is not https; "
                "refused. Point the mirror at the https address"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _too_large(part: Path, url: str, size: int, limit: int) -> CheckpointTooLarge:
    part.unlink(missing_ok=True)
    return CheckpointTooLarge(
        f"{url} is larger than the {limit}-byte cap ({MAX_BYTES_ENV}): {size} bytes; the "
        "partial file was removed"
    )


def _download(
    url: str,
    part: Path,
    progress: Progress | None,
    timeout: float,
    limit: int,
    allow_insecure: bool,
) -> None:
    offset = part.stat().st_size if part.exists() else 0
    if offset > limit:
        raise _too_large(part, url, offset, limit)
    request = urllib.request.Request(url, headers={"User-Agent": "bitserve"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    manual = f"or download {url} yourself and save it as {part.with_suffix('')}"
    opener = urllib.request.build_opener(_NoDowngradeRedirects(allow_insecure))
    try:
        response = opener.open(request, timeout=timeout)
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
        if total is not None and total > limit:
            raise _too_large(part, url, total, limit)  # said up front: nothing is read
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
                    if done > limit:  # no or a false Content-Length: stop at the cap
                        fh.close()
                        raise _too_large(part, url, done, limit)
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
