"""bitcore.atomic: the one writer of every file bitcore publishes (mode, cleanup, atomicity)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bitcore.atomic import FILE_MODE, atomic_write, commit_file, write_json_atomic


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_file_mode_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "weights.bin"
    previous = os.umask(0)  # a umask that would otherwise leave the file 0666
    try:
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"abc")
    finally:
        os.umask(previous)
    assert FILE_MODE == 0o600
    assert _mode(target) == 0o600
    assert target.read_bytes() == b"abc"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_temp_file_is_hidden_and_in_the_same_directory(tmp_path: Path) -> None:
    target = tmp_path / "index.json"
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".index.json.") and tmp.name.endswith(".tmp")
        assert not target.exists()  # nothing is visible under the real name before the end


def test_an_exception_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "metadata.json"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_write(target) as tmp:
        tmp.write_text("half of the new", encoding="utf-8")
        raise RuntimeError("disk on fire")
    assert target.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metadata.json"]


def test_content_is_replaced_in_one_rename(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old", encoding="utf-8")
    old_inode = target.stat().st_ino
    with atomic_write(target) as tmp:
        tmp.write_text("new", encoding="utf-8")
        new_inode = tmp.stat().st_ino
        assert target.read_text(encoding="utf-8") == "old"  # readers still see the old file
    assert target.read_text(encoding="utf-8") == "new"
    # The target is now the temp file itself (renamed), not the old file rewritten in place.
    assert target.stat().st_ino == new_inode != old_inode
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_write_json_atomic(tmp_path: Path) -> None:
    target = tmp_path / "meta.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    assert target.read_text(encoding="utf-8") == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}'
    write_json_atomic(target, {"b": 1, "a": [1, 2]}, indent=None)
    assert target.read_text(encoding="utf-8") == '{"a": [1, 2], "b": 1}'
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": [1, 2], "b": 1}
    assert _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_commit_file_publishes_a_named_temp_file(tmp_path: Path) -> None:
    part = tmp_path / "BiT-S-R50x1.npz.part"
    part.write_bytes(b"npz bytes")
    os.chmod(part, 0o644)
    commit_file(part, tmp_path / "BiT-S-R50x1.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["BiT-S-R50x1.npz"]
    assert (tmp_path / "BiT-S-R50x1.npz").read_bytes() == b"npz bytes"
    assert _mode(tmp_path / "BiT-S-R50x1.npz") == 0o600
