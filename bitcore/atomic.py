"""Write files so that a reader sees the old content or the new one, never half a file.

Every file bitcore writes for others to read (artifacts, dataset indexes, image caches,
training checkpoints, exported and downloaded .npz checkpoints) goes through here:

1. the bytes go to a hidden temporary file in the target's own directory (same filesystem, so
   the rename below is atomic, and directory listings that glob for real names skip it);
2. the temporary file is fsynced, so a crash after the rename cannot leave an empty file;
3. it gets mode 0o644 (FILE_MODE) and `os.replace` puts it in place;
4. on any error the temporary file is removed and the target is left as it was.

Why 0o644 and not mkstemp's 0o600: these files are read by other processes than the one that
wrote them (the API serves artifacts a worker wrote, DataLoader workers and DDP ranks map the
image cache, containers sharing a volume may run as other users). None of them is secret.
A secret (an API key file) passes mode=SECRET_MODE: mkstemp creates the temporary file 0o600,
so the secret is never readable by others, not even for a moment.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_MODE = 0o644
SECRET_MODE = 0o600


@contextlib.contextmanager
def atomic_write(path: str | Path, *, mode: int = FILE_MODE) -> Iterator[Path]:
    """Yield a temporary path next to `path`; write it, and on success it replaces `path`.

    A path rather than an open file, because some writers only take a file name
    (safetensors' save_file, np.memmap). The final file has `mode` (FILE_MODE, 0o644).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        commit_file(tmp, path, mode=mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
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


def write_json_atomic(path: str | Path, data: Any, *, indent: int | None = 2) -> None:
    """`data` as UTF-8 JSON (keys sorted), written with `atomic_write` (mode 0o644).

    indent=None writes one line, for machine-read files that list every sample of a dataset.
    """
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, sort_keys=True), encoding="utf-8")
