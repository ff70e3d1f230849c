"""Safe archive extraction: every refused member refuses the whole archive before a write."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from bitcore.data.index import index_directory
from service.archives import (
    RATIO_MIN_BYTES,
    ArchiveError,
    ArchiveUnsafe,
    Limits,
    _CountingReader,
    detect_kind,
    extract_archive,
    safe_relpath,
)
from service.http_errors import status_of
from tests.imagegen import make_archive, make_image_folder

LIMITS = Limits(max_entries=1000, max_uncompressed_bytes=64 << 20, max_compression_ratio=200)


def _zip(path: Path, members: dict[str, bytes], *, mode: int | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.create_system = 3
                info.external_attr = mode << 16
            archive.writestr(info, data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    data = data or {}
    with tarfile.open(path, "w:gz") as archive:
        for info in members:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def _file(name: str, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


def _refused(tmp_path: Path, archive: Path, limits: Limits = LIMITS) -> ArchiveError:
    target = tmp_path / "out"
    with pytest.raises(ArchiveError) as caught:
        extract_archive(archive, target, limits)
    # Refused in the scan: not one file was written, inside the target or next to it.
    written = [p for p in target.rglob("*") if p.is_file()] if target.exists() else []
    assert written == []
    assert not (tmp_path / "evil.png").exists()
    return caught.value


def _tree(root: Path) -> dict[str, int]:
    out = {}
    for path in sorted(root.rglob("*")):
        assert not path.is_symlink()
        if path.is_file():
            assert stat.S_ISREG(path.lstat().st_mode)
            out[path.relative_to(root).as_posix()] = path.stat().st_size
    return out


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_extracts_a_dataset_with_one_top_level_folder(tmp_path: Path, kind: str) -> None:
    folder = make_image_folder(tmp_path / "src", {"cat": 3, "dog": 2}, top_level="pets")
    archive = make_archive(folder, kind)
    assert detect_kind(archive) == kind
    result = extract_archive(archive, tmp_path / "out", LIMITS)
    expected = _tree(folder)
    assert _tree(tmp_path / "out") == expected
    assert result.files == 5 and result.bytes == sum(expected.values()) and result.skipped == []
    index = index_directory(tmp_path / "out", min_images_per_class=2)
    assert index.classes == ["cat", "dog"] and index.counts() == {"cat": 3, "dog": 2}
    assert index.root.name == "pets"


def test_detect_kind_uses_magic_bytes_not_names(tmp_path: Path) -> None:
    fake = tmp_path / "data.zip"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    assert detect_kind(fake) is None
    gz = tmp_path / "looks-like.png"
    gz.write_bytes(b"\x1f\x8b\x08\x00rest")
    assert detect_kind(gz) == "tar.gz"
    error = _refused(tmp_path, fake)
    assert (status_of(error), error.code) == (415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.png", "path_traversal"),
        ("cat/../../evil.png", "path_traversal"),
        ("..\\evil.png", "path_traversal"),
        ("/etc/evil.png", "absolute_path"),
        ("C:/evil.png", "absolute_path"),
        ("C:\\evil.png", "absolute_path"),
    ],
)
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_names_escaping_the_target_are_refused(
    tmp_path: Path, kind: str, name: str, reason: str
) -> None:
    members = {"cat/ok.png": b"ok", name: b"evil"}
    if kind == "zip":
        archive = _zip(tmp_path / "a.zip", members)
    else:
        archive = _tar(tmp_path / "a.tar.gz", [_file(n) for n in members], members)
    error = _refused(tmp_path, archive)
    assert (status_of(error), error.code) == (422, "archive_unsafe")
    assert error.details["reason"] == reason


@pytest.mark.parametrize(
    ("link_type", "linkname"),
    [
        (tarfile.SYMTYPE, "/etc/passwd"),
        (tarfile.SYMTYPE, "ok.png"),
        (tarfile.LNKTYPE, "cat/ok.png"),
    ],
)
def test_tar_links_are_refused(tmp_path: Path, link_type: bytes, linkname: str) -> None:
    link = _file("cat/link.png", link_type)
    link.linkname = linkname
    archive = _tar(tmp_path / "a.tar.gz", [_file("cat/ok.png"), link], {"cat/ok.png": b"x"})
    error = _refused(tmp_path, archive)
    assert (error.code, error.details["reason"]) == ("archive_unsafe", "link")


@pytest.mark.parametrize("device", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_tar_devices_and_fifos_are_refused(tmp_path: Path, device: bytes) -> None:
    archive = _tar(tmp_path / "a.tar.gz", [_file("cat/dev.png", device)])
    error = _refused(tmp_path, archive)
    assert (error.code, error.details["reason"]) == ("archive_unsafe", "special")


def test_zip_symlink_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {"cat/link.png": b"/etc/passwd"}, mode=stat.S_IFLNK | 0o777)
    error = _refused(tmp_path, archive)
    assert (error.code, error.details["reason"]) == ("archive_unsafe", "link")


def test_zip_device_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {"cat/dev.png": b""}, mode=stat.S_IFCHR | 0o644)
    error = _refused(tmp_path, archive)
    assert (error.code, error.details["reason"]) == ("archive_unsafe", "special")


def test_zip_bomb_by_compression_ratio(tmp_path: Path) -> None:
    zeros = bytes(RATIO_MIN_BYTES + 1)  # ~1000x with deflate
    archive = _zip(tmp_path / "a.zip", {"cat/ok.png": b"x" * 10, "cat/bomb.png": zeros})
    error = _refused(tmp_path, archive)
    assert (status_of(error), error.code) == (422, "archive_unsafe")
    assert error.details["reason"] == "compression_ratio"
    assert error.details["path"] == "cat/bomb.png"
    assert error.details["ratio"] > 200


def test_small_members_are_not_held_to_the_ratio(tmp_path: Path) -> None:
    # A flat BMP-like member compresses ~500x but is tiny: it cannot bomb anything.
    archive = _zip(tmp_path / "a.zip", {"cat/flat.bmp": bytes(100_000)})
    assert extract_archive(archive, tmp_path / "out", LIMITS).files == 1


def test_gzip_bomb_by_ratio_of_the_whole_stream(tmp_path: Path) -> None:
    zeros = bytes(4 << 20)  # ~1000x with gzip
    archive = _tar(tmp_path / "a.tar.gz", [_file("cat/bomb.png")], {"cat/bomb.png": zeros})
    limits = Limits(max_compression_ratio=200, archive_ratio_min_bytes=1 << 20)
    error = _refused(tmp_path, archive, limits)
    assert (status_of(error), error.code) == (422, "archive_unsafe")
    assert error.details["reason"] == "compression_ratio"
    assert error.details["ratio"] > 200
    # Under the stream floor (default 64 MiB) the same archive is accepted.
    assert extract_archive(archive, tmp_path / "ok", LIMITS).bytes == 4 << 20


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_total_uncompressed_size_is_capped(tmp_path: Path, kind: str) -> None:
    members = {f"cat/{i}.png": os.urandom(400) for i in range(3)}  # 1200 bytes, incompressible
    if kind == "zip":
        archive = _zip(tmp_path / "a.zip", members)
    else:
        archive = _tar(tmp_path / "a.tar.gz", [_file(n) for n in members], members)
    limits = Limits(max_entries=100, max_uncompressed_bytes=1000, max_compression_ratio=200)
    error = _refused(tmp_path, archive, limits)
    assert (status_of(error), error.code) == (413, "archive_too_large")
    assert error.details["reason"] == "uncompressed_size"
    roomy = Limits(max_entries=100, max_uncompressed_bytes=1200, max_compression_ratio=200)
    assert extract_archive(archive, tmp_path / "ok", roomy).bytes == 1200


def test_decompressed_stream_is_capped_while_reading() -> None:
    # Backstop for tar: the gzip stream itself stops at the cap, whatever the headers say.
    raw, compressed = io.BytesIO(bytes(5000)), io.BytesIO(bytes(5000))
    reader = _CountingReader(raw, compressed, 4096, LIMITS, "a.tar.gz")
    assert len(reader.read(4096)) == 4096
    with pytest.raises(ArchiveError) as caught:
        reader.read(10)
    assert (status_of(caught.value), caught.value.code) == (413, "archive_too_large")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_too_many_entries(tmp_path: Path, kind: str) -> None:
    members = {f"cat/{i}.png": b"x" for i in range(4)}
    if kind == "zip":
        archive = _zip(tmp_path / "a.zip", members)
    else:
        archive = _tar(tmp_path / "a.tar.gz", [_file(n) for n in members], members)
    limits = Limits(max_entries=3, max_uncompressed_bytes=1 << 20, max_compression_ratio=200)
    error = _refused(tmp_path, archive, limits)
    assert (status_of(error), error.code, error.details["reason"]) == (
        413,
        "archive_too_large",
        "too_many_entries",
    )
    exact = Limits(max_entries=4, max_uncompressed_bytes=1 << 20, max_compression_ratio=200)
    assert extract_archive(archive, tmp_path / "ok", exact).files == 4


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_nested_archives_are_skipped_and_listed(tmp_path: Path, kind: str) -> None:
    members = {
        "cat/a.png": b"a",
        "cat/inner.zip": b"PK\x03\x04",
        "dog/more.tar.gz": b"\x1f\x8b",
        "dog/x.TGZ": b"",
    }
    if kind == "zip":
        archive = _zip(tmp_path / "a.zip", members)
    else:
        archive = _tar(tmp_path / "a.tar.gz", [_file(n) for n in members], members)
    result = extract_archive(archive, tmp_path / "out", LIMITS)
    assert _tree(tmp_path / "out") == {"cat/a.png": 1}
    assert sorted((s.path, s.reason) for s in result.skipped) == [
        ("cat/inner.zip", "nested_archive"),
        ("dog/more.tar.gz", "nested_archive"),
        ("dog/x.TGZ", "nested_archive"),
    ]


def test_macos_resource_forks_are_not_extracted(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {"cat/a.png": b"a", "__MACOSX/cat/._a.png": b"fork"})
    result = extract_archive(archive, tmp_path / "out", LIMITS)
    assert _tree(tmp_path / "out") == {"cat/a.png": 1} and result.files == 1


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_empty_folders_are_kept(tmp_path: Path, kind: str) -> None:
    # An empty class folder must reach the indexer, which then names it ("emu": 0 images).
    if kind == "zip":
        archive = _zip(tmp_path / "a.zip", {"cat/a.png": b"a", "emu/": b""})
    else:
        archive = _tar(
            tmp_path / "a.tar.gz",
            [_file("cat/a.png"), _file("emu", tarfile.DIRTYPE)],
            {"cat/a.png": b"a"},
        )
    result = extract_archive(archive, tmp_path / "out", LIMITS)
    assert (tmp_path / "out" / "emu").is_dir() and result.folders == ["emu"]
    assert list((tmp_path / "out" / "emu").iterdir()) == []


def test_duplicate_members_are_refused(tmp_path: Path) -> None:
    archive = _tar(
        tmp_path / "a.tar.gz",
        [_file("cat/a.png"), _file("./cat/a.png")],
        {"cat/a.png": b"1", "./cat/a.png": b"2"},
    )
    with pytest.raises(ArchiveError) as caught:
        extract_archive(archive, tmp_path / "out", LIMITS)
    assert (caught.value.code, caught.value.details["path"]) == ("archive_invalid", "cat/a.png")


def test_file_and_folder_with_the_same_name(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {"cat": b"file", "cat/a.png": b"a"})
    with pytest.raises(ArchiveError) as caught:
        extract_archive(archive, tmp_path / "out", LIMITS)
    assert (status_of(caught.value), caught.value.code) == (422, "archive_invalid")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_truncated_archives_are_invalid_not_500(tmp_path: Path, kind: str) -> None:
    folder = make_image_folder(tmp_path / "src", {"cat": 2, "dog": 2})
    archive = make_archive(folder, kind)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError) as caught:
        extract_archive(archive, tmp_path / "out", LIMITS)
    assert (status_of(caught.value), caught.value.code) == (422, "archive_invalid")


def test_encrypted_zip_members_are_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {"cat/a.png": b"a"})
    data = bytearray(archive.read_bytes())
    # Set the "encrypted" flag bit in the local and central headers.
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.index(signature) + offset
        data[at] |= 0x01
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError) as caught:
        extract_archive(archive, tmp_path / "out", LIMITS)
    assert caught.value.code == "archive_invalid"


def test_safe_relpath_normalises() -> None:
    assert safe_relpath("./cat//a.png") == "cat/a.png"
    assert safe_relpath("cat\\a.png") == "cat/a.png"
    assert safe_relpath("./") is None
    with pytest.raises(ArchiveError):
        safe_relpath("cat/\x00.png")
    with pytest.raises(ArchiveError):
        safe_relpath("a" * 256 + "/x.png")


@pytest.mark.parametrize("folder", ["ca\nt", "ca\rt", "cat\u202e", "cat\u2028", "c\tat"])
def test_class_folder_names_with_control_characters_are_refused(
    tmp_path: Path, folder: str
) -> None:
    """Issue 11: a class name with a newline forges log lines and listings; U+202E makes a
    class read as another. The folder names become class names, so the archive is refused."""
    archive = _zip(tmp_path / "a.zip", {f"{folder}/x.png": b"\x89PNG", "dog/y.png": b"\x89PNG"})
    error = _refused(tmp_path, archive)
    assert isinstance(error, ArchiveUnsafe)
    assert error.details["reason"] == "bad_name"
    assert f"U+{ord(next(c for c in folder if not c.isalpha())):04X}" in error.message


def test_file_names_with_control_characters_are_kept(tmp_path: Path) -> None:
    # macOS writes a custom folder icon as "Icon\r": a file name is stored, never a class name.
    archive = _zip(tmp_path / "a.zip", {"cat/Icon\r": b"x", "cat/a.png": b"\x89PNG"})
    out = extract_archive(archive, tmp_path / "out", LIMITS)
    assert sorted(_tree(tmp_path / "out")) == ["cat/Icon\r", "cat/a.png"]
    assert out.skipped == []
