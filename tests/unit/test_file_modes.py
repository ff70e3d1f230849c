"""Issue 11: "the default data directory is 0755 and its files 0644". Now files 0600 and
directories 0700: bitcore.atomic's modes, Storage's root, and the `bitserve` commands' umask,
checked on a real `bitserve migrate` in a child process started with the usual 0o022 umask."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from bitcore.atomic import DIR_MODE, FILE_MODE, atomic_write, make_private_dir
from service.storage import Storage


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_dirs_are_0700_with_their_missing_parents_whatever_the_umask(
    tmp_path: Path,
) -> None:
    (tmp_path / "existing").mkdir(mode=0o755)
    os.chmod(tmp_path / "existing", 0o755)
    previous = os.umask(0)
    try:
        made = make_private_dir(tmp_path / "existing" / "a" / "b")
    finally:
        os.umask(previous)
    assert made == tmp_path / "existing" / "a" / "b"
    assert (DIR_MODE, FILE_MODE) == (0o700, 0o600)
    assert _mode(tmp_path / "existing" / "a") == 0o700
    assert _mode(made) == 0o700
    assert _mode(tmp_path / "existing") == 0o755  # not ours to change


def test_the_store_root_and_upload_folder_are_private(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "home" / "store")
    storage.check()
    assert _mode(tmp_path / "home") == 0o700
    assert _mode(storage.root) == 0o700
    assert _mode(storage.upload_tmp()) == 0o700
    with atomic_write(storage.root / "index.json") as tmp:
        tmp.write_text("{}")
    assert _mode(storage.root / "index.json") == 0o600


def test_bitserve_migrate_leaves_no_file_readable_by_others(tmp_path: Path) -> None:
    home = tmp_path / "data" / "home"
    env = {**os.environ, "BITSERVE_HOME": str(home)}
    for name in ("DATABASE_URL", "BITSERVE_DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL"):
        env.pop(name, None)  # the embedded SQLite database under BITSERVE_HOME
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from service.cli import main; sys.exit(main())",
            "migrate",
        ],
        env=env,
        umask=0o022,  # the usual default, which made the database 0644 and the home 0755
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (home / "bitserve.db").is_file()
    modes = {
        path.relative_to(tmp_path).as_posix(): _mode(path)
        for path in [tmp_path / "data", *sorted((tmp_path / "data").rglob("*"))]
    }
    assert modes["data"] == modes["data/home"] == 0o700
    assert modes["data/home/bitserve.db"] == 0o600
    assert {mode for path, mode in modes.items() if mode & 0o077} == set(), modes
