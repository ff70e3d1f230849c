"""Write files so that a reader sees the old content or the new one, never half a file.

Every file bitcore writes for others to read (artifacts, dataset indexes, image caches,
training checkpoints, exported and downloaded .npz checkpoints) goes through here:

1. the bytes go to a hidden temporary file in the target's own directory (same filesystem, so
   the rename below is atomic, and directory listings that glob for real names skip it);
2. the temporary file is fsynced, so a crash after the rename cannot leave an empty file;
3. it gets mode 0o600 (FILE_MODE) and `os.replace` puts it in place;
4. on any error the temporary file is removed and the target is left as it was.

A full disk (ENOSPC, or EDQUOT past a disk quota) is reported as `DiskFull`, an OSError with
that errno, whichever writer hit it: safetensors wraps it in its own SafetensorError, torch.save
in a RuntimeError ("unexpected pos ..."), np.save in an errno-less OSError. Callers test
`is_disk_full(exc)` and tell the user the server's disk is full rather than "an internal error".

Why 0o600 (issue 11): the files are users' data (uploaded images, trained weights) and nobody
but the service's own user needs them; the processes that read them (the API serving what a
worker wrote, DataLoader workers, DDP ranks, containers sharing a volume) all run as that user.
Directories bitserve creates are 0o700 (DIR_MODE, `make_private_dir`), and the `bitserve`
commands set the umask to 0o077 so that files other libraries create (the SQLite database,
upload temporaries) are private too. A secret (an API key file) passes mode=SECRET_MODE, the
same: mkstemp creates the temporary file 0o600, so it is never readable by others, not even
for a moment.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_MODE = 0o600
SECRET_MODE = 0o600
DIR_MODE = 0o700
PRIVATE_UMASK = 0o077  # what the `bitserve` commands set at start (service.cli)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Writers that hide the errno still say it in words (safetensors: "... (os error 28)").
_DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
# Below this many free bytes after a failed write, the write failed because the disk is full:
# the half-written temporary file is still there, so a full disk reads as (nearly) 0 free.
NEARLY_FULL_BYTES = 1 << 20


class DiskFull(OSError):
    """No space left (or over a disk quota) on the filesystem a file was being written to."""


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or an exception it was raised from) is a full disk or a disk quota."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(words in str(exc).lower() for words in _DISK_FULL_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free_bytes(directory: Path) -> int | None:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _disk_full_error(exc: BaseException, path: Path) -> DiskFull | None:
    """A DiskFull for a failed write of `path`, or None if the disk was not the cause."""
    if isinstance(exc, DiskFull):
        return None  # already said
    free = _free_bytes(path.parent)
    if not is_disk_full(exc) and not (
        isinstance(exc, OSError | RuntimeError) and free is not None and free < NEARLY_FULL_BYTES
    ):
        return None
    code = exc.errno if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS else None
    return DiskFull(code or errno.ENOSPC, f"no space left to write {path.name}", str(path.parent))


@contextlib.contextmanager
def atomic_write(path: str | Path, *, mode: int = FILE_MODE) -> Iterator[Path]:
    """Yield a temporary path next to `path`; write it, and on success it replaces `path`.

    A path rather than an open file, because some writers only take a file name
    (safetensors' save_file, np.memmap). The final file has `mode` (FILE_MODE, 0o600).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        commit_file(tmp, path, mode=mode)
    except BaseException as exc:
        full = _disk_full_error(exc, path)  # judged before the unlink frees the space
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from exc
        raise


def commit_file(tmp: str | Path, path: str | Path, *, mode: int = FILE_MODE) -> None:
    """fsync `tmp`, give it `mode` and rename it onto `path` (same directory).

    The last step of `atomic_write`; called directly only where the temporary file must have a
    name known in advance (a resumable download's .part, see bitcore.catalog).
    """
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, mode)  # explicit, so the umask of whichever process wrote it does not matter
    os.replace(tmp, path)


def make_private_dir(path: str | Path) -> Path:
    """Create `path` and each missing parent with DIR_MODE (0o700), whatever the umask;
    existing directories are left as they are (an operator may have chosen their mode)."""
    target = Path(path)
    missing: list[Path] = []
    current = target
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(directory, DIR_MODE)  # mkdir's mode is masked by the umask; this is not
    return target


def reserve(path: str | Path, size: int) -> None:
    """Allocate `size` bytes for `path` on disk now, so that a full disk is an ENOSPC here.

    For files written through a memory map: a write to a mapped page the filesystem has no
    room for is not an error the program can catch but a SIGBUS that kills the process (the
    API server, when a dataset is uploaded to a full disk).
    """
    if size <= 0 or not hasattr(os, "posix_fallocate"):  # not on macOS: no such guard there
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        os.posix_fallocate(fd, 0, size)  # glibc writes zeros where the filesystem cannot
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise DiskFull(exc.errno, f"no space left for {size} bytes", str(path)) from exc
        raise
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, data: Any, *, indent: int | None = 2) -> None:
    """`data` as UTF-8 JSON (keys sorted), written with `atomic_write` (mode 0o600).

    indent=None writes one line, for machine-read files that list every sample of a dataset.
    """
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, sort_keys=True), encoding="utf-8")
