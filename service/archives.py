"""Safe extraction of uploaded dataset archives (.zip, .tar.gz).

Two passes. The first reads only metadata (member names, types, declared sizes) and refuses
the whole archive if any member could escape the target (`../`, absolute paths, drive
letters), is a link, device or FIFO, or if the archive is too big once uncompressed (entry
count, total size, compression ratio: zip bombs). Only then does the second pass write, and it
writes regular files only, at paths we compute, counting the bytes it actually writes (a
header may lie about sizes). Python's tarfile `filter="data"` is applied as a second opinion on
every tar member, not relied on alone.

Nested archives (.zip, .tar, .gz, ...) are not extracted: they are skipped and reported, so a
dataset cannot smuggle a second level of decompression past the limits.
"""

from __future__ import annotations

import gzip
import io
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

from service.domain_errors import InvalidRequest, TooLarge, UnsupportedMedia
from service.names import describe, first_refused

ArchiveKind = Literal["zip", "tar.gz"]
NESTED_SUFFIXES = (
    ".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz", ".tbz2", ".xz", ".txz", ".zst", ".7z", ".rar",
    ".lz", ".lzma", ".z",
)  # fmt: skip
SKIPPED_DIRS = frozenset({"__MACOSX"})  # macOS resource forks: never images
# Small outputs are not held to the ratio limit: a 200x ratio only matters once the output is
# big, and tiny flat images (a solid-colour BMP) compress far better than that. The whole
# archive (a zip's declared sizes summed, a tar.gz's one gzip stream) is held to the ratio
# past a larger floor: many small flat images together may legitimately pass 1 MiB, but 500
# members of 1 MiB each, every one under the per-member floor, must not expand 900x.
RATIO_MIN_BYTES = 1 << 20
ARCHIVE_RATIO_MIN_BYTES = 64 << 20
COPY_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


class ArchiveError(InvalidRequest):
    """The archive is refused: invalid input, unless a subclass names another kind first."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(code, message, details)


class ArchiveTooLarge(TooLarge, ArchiveError):
    """Too many entries, or too many bytes once uncompressed."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__("archive_too_large", message, **details)


class ArchiveUnsafe(ArchiveError):
    """A member could escape the target, is a link or special file, or is a zip bomb."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__("archive_unsafe", message, **details)


class ArchiveInvalid(ArchiveError):
    """Corrupt, truncated, encrypted or self-contradictory."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__("archive_invalid", message, **details)


class NotAnArchive(UnsupportedMedia, ArchiveError):
    def __init__(self, message: str, **details: Any) -> None:
        super().__init__("unsupported_media_type", message, **details)


def _unsafe(message: str, path: str, reason: str) -> ArchiveUnsafe:
    return ArchiveUnsafe(message, path=path, reason=reason)


@dataclass(frozen=True)
class Limits:
    max_entries: int = 100_000
    max_uncompressed_bytes: int = 8 << 30
    max_compression_ratio: float = 200.0
    ratio_min_bytes: int = RATIO_MIN_BYTES  # per zip member
    archive_ratio_min_bytes: int = ARCHIVE_RATIO_MIN_BYTES  # the whole archive, zip or tar.gz


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class Extracted:
    files: int = 0
    bytes: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)  # created even if empty (empty classes)


@dataclass(frozen=True)
class _Member:
    path: str  # normalised relative posix path
    size: int
    handle: object  # ZipInfo or TarInfo, for the second pass


def detect_kind(path: str | Path) -> ArchiveKind | None:
    """The archive type from its first bytes (never from a name or a Content-Type)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # local file header, or an empty zip
        return "zip"
    if head[:2] == b"\x1f\x8b":  # gzip: a tar inside is checked while reading it
        return "tar.gz"
    return None


def safe_relpath(name: str) -> str | None:
    """The member name as a relative posix path, None for "." entries; raises if unsafe."""
    if "\x00" in name:
        raise _unsafe("member name contains a NUL byte", name, "bad_name")
    # Backslashes: some Windows tools write them as separators; treat them so, so that
    # "..\\x" cannot hide a parent reference.
    posix = name.replace("\\", "/")
    if posix.startswith("/") or _DRIVE.match(posix):
        raise _unsafe(f"member {name!r} has an absolute path", name, "absolute_path")
    parts = [p for p in PurePosixPath(posix).parts if p not in ("", ".")]
    if ".." in parts:
        raise _unsafe(f"member {name!r} escapes the archive folder", name, "path_traversal")
    if any(len(p.encode()) > 255 for p in parts):
        raise _unsafe(f"member {name!r} has a name part over 255 bytes", name, "bad_name")
    # Folder names become class names: shown in listings, logs and predictions, so they hold no
    # control or format characters (service.names). File names may (macOS writes "Icon\r"):
    # they are only ever stored and listed escaped.
    for folder in parts[:-1]:
        char = first_refused(folder)
        if char is not None:
            raise _unsafe(
                f"member {name!r}: the folder name {folder!r} contains {describe(char)}; "
                "class folder names may not contain control or format characters",
                name,
                "bad_name",
            )
    return "/".join(parts) or None


def is_nested_archive(path: str) -> bool:
    lower = path.lower()
    return lower.endswith(NESTED_SUFFIXES)


def _skipped_dir(path: str) -> bool:
    return any(part in SKIPPED_DIRS for part in path.split("/"))


class _Budget:
    """Counts entries and bytes against the limits; raises the API error when crossed."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.entries = 0
        self.declared = 0

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise ArchiveTooLarge(
                f"archive has more than {self.limits.max_entries} entries",
                reason="too_many_entries",
                limit=self.limits.max_entries,
            )

    def size(self, path: str, size: int) -> None:
        self.declared += size
        if self.declared > self.limits.max_uncompressed_bytes:
            raise ArchiveTooLarge(
                f"archive expands to more than {self.limits.max_uncompressed_bytes} bytes",
                reason="uncompressed_size",
                limit=self.limits.max_uncompressed_bytes,
            )

    def ratio(self, path: str, size: int, compressed: int) -> None:
        ratio = size / max(1, compressed)
        if size > self.limits.ratio_min_bytes and ratio > self.limits.max_compression_ratio:
            raise _ratio_error(path, ratio, self.limits.max_compression_ratio)

    def whole_archive(self, archive_bytes: int) -> None:
        """Every member's declared size together against the archive's own size."""
        _check_archive_ratio(self.declared, archive_bytes, self.limits)


def _ratio_error(path: str, ratio: float, limit: float) -> ArchiveUnsafe:
    return ArchiveUnsafe(
        f"member {path!r} expands {ratio:.0f}x (limit {limit:.0f}x): refused as a zip bomb",
        path=path,
        reason="compression_ratio",
        ratio=round(ratio, 1),
        limit=limit,
    )


def _check_archive_ratio(expanded: int, archive_bytes: int, limits: Limits) -> None:
    ratio = expanded / max(1, archive_bytes)
    if expanded > limits.archive_ratio_min_bytes and ratio > limits.max_compression_ratio:
        raise ArchiveUnsafe(
            f"the archive expands {ratio:.0f}x as a whole (limit "
            f"{limits.max_compression_ratio:.0f}x past {limits.archive_ratio_min_bytes} bytes): "
            "refused as a zip bomb",
            reason="compression_ratio",
            scope="archive",
            ratio=round(ratio, 1),
            limit=limits.max_compression_ratio,
        )


# --- zip -------------------------------------------------------------------------------------


def _scan_zip(archive: zipfile.ZipFile, budget: _Budget, out: Extracted) -> list[_Member]:
    members: list[_Member] = []
    for info in archive.infolist():
        budget.entry()
        path = safe_relpath(info.filename)
        mode = info.external_attr >> 16  # unix mode, when the creator was a unix tool
        kind = stat.S_IFMT(mode) if info.create_system == 3 else 0
        if kind == stat.S_IFLNK:
            raise _unsafe(f"member {info.filename!r} is a symbolic link", info.filename, "link")
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise _unsafe(
                f"member {info.filename!r} is a device, FIFO or socket", info.filename, "special"
            )
        if path is None or _skipped_dir(path):
            continue
        if info.is_dir():
            out.folders.append(path)
            continue
        if info.flag_bits & 0x1:
            raise ArchiveInvalid("encrypted zip members are not supported", path=path)
        budget.size(path, info.file_size)
        budget.ratio(path, info.file_size, info.compress_size)
        if is_nested_archive(path):
            out.skipped.append(Skipped(path, "nested_archive"))
            continue
        members.append(_Member(path, info.file_size, info))
    # Per-member floors let many small members through one by one: the sum is held too.
    fp = archive.fp
    budget.whole_archive(_size_of(fp) if fp is not None else 0)
    return members


def _size_of(handle: IO[bytes]) -> int:
    position = handle.tell()
    size = handle.seek(0, io.SEEK_END)
    handle.seek(position)
    return size


# --- tar.gz ----------------------------------------------------------------------------------


class _CountingReader:
    """The decompressed tar stream, refused as it is read once it grows past `limit` bytes or
    past `max_ratio` times the compressed bytes read so far (gzip bombs stop early, not after
    decompressing gigabytes)."""

    def __init__(
        self, raw: io.BufferedIOBase, compressed: IO[bytes], limit: int, limits: Limits, name: str
    ) -> None:
        self.raw = raw
        self.compressed = compressed
        self.limit = limit
        self.limits = limits
        self.name = name
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        if self.count > self.limit:
            raise ArchiveTooLarge(
                f"archive expands to more than {self.limit} bytes",
                reason="uncompressed_size",
                limit=self.limit,
            )
        # tell() runs ahead of what was decompressed (read-ahead): errs towards accepting.
        _check_archive_ratio(self.count, self.compressed.tell(), self.limits)
        return data


def _tar_stream_limit(limits: Limits) -> int:
    # Tar adds a 512-byte header per member and pads data to 512 bytes, plus end blocks.
    return limits.max_uncompressed_bytes + 1024 * (limits.max_entries + 2) + 10240


def _scan_tar(path: Path, limits: Limits, budget: _Budget, out: Extracted) -> list[_Member]:
    members: list[_Member] = []
    with open(path, "rb") as compressed, gzip.GzipFile(fileobj=compressed, mode="rb") as raw:
        counted = _CountingReader(raw, compressed, _tar_stream_limit(limits), limits, path.name)
        # Stream mode ("r|"): one pass, nothing buffered, member data skipped as it goes by.
        with tarfile.open(fileobj=counted, mode="r|") as archive:  # type: ignore[call-overload]
            for info in archive:
                budget.entry()
                rel = safe_relpath(info.name)
                if info.issym() or info.islnk():
                    raise _unsafe(f"member {info.name!r} is a link", info.name, "link")
                if not (info.isfile() or info.isdir()):
                    raise _unsafe(
                        f"member {info.name!r} is a device, FIFO or other special file",
                        info.name,
                        "special",
                    )
                try:  # Python's own policy as a second opinion
                    tarfile.data_filter(info, "/nonexistent-target")
                except tarfile.FilterError as exc:
                    raise _unsafe(
                        f"member {info.name!r} refused: {exc}", info.name, "filter"
                    ) from None
                if rel is None or _skipped_dir(rel):
                    continue
                if info.isdir():
                    out.folders.append(rel)
                    continue
                budget.size(rel, info.size)
                if is_nested_archive(rel):
                    out.skipped.append(Skipped(rel, "nested_archive"))
                    continue
                members.append(_Member(rel, info.size, info.name))
    return members


# --- extraction ------------------------------------------------------------------------------


def _target_path(target: Path, rel: str) -> Path:
    dest = (target / rel).resolve()
    if not dest.is_relative_to(target) or dest == target:
        raise _unsafe(f"member {rel!r} escapes the target folder", rel, "path_traversal")
    return dest


def _copy(
    source: IO[bytes],
    dest: Path,
    declared: int,
    rel: str,
    total: list[int],
    limit: int,
    head: bytes = b"",
) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    # "xb": never follow or overwrite something already there (duplicate names are refused).
    try:
        with open(dest, "xb") as handle:
            chunk = head
            while chunk or (chunk := source.read(COPY_CHUNK)):
                written += len(chunk)
                total[0] += len(chunk)
                if written > declared or total[0] > limit:
                    raise ArchiveTooLarge(
                        f"member {rel!r} expands beyond its declared size",
                        reason="uncompressed_size",
                        path=rel,
                    )
                handle.write(chunk)
                chunk = b""
    except FileExistsError:
        raise ArchiveInvalid(f"member {rel!r} appears twice", path=rel) from None
    return written


def _zip_files(path: Path, members: list[_Member]) -> Iterator[tuple[_Member, IO[bytes]]]:
    with zipfile.ZipFile(path) as archive:
        for member in members:
            assert isinstance(member.handle, zipfile.ZipInfo)
            with archive.open(member.handle) as source:
                yield member, source


def _tar_files(path: Path, members: list[_Member]) -> Iterator[tuple[_Member, IO[bytes]]]:
    wanted = {str(m.handle): m for m in members}
    with tarfile.open(path, mode="r:gz") as archive:
        for info in archive:
            member = wanted.get(info.name)
            if member is None or not info.isfile():
                continue
            source = archive.extractfile(info)
            if source is None:  # pragma: no cover - isfile() members always have data
                continue
            with source:
                yield member, source


# Given a member's path and its first HEAD_BYTES, why it is not written: None to write it, ""
# to drop it silently, or a reason reported in `Extracted.skipped`.
SkipRule = Callable[[str, bytes], str | None]
HEAD_BYTES = 16


def extract_archive(
    path: str | Path,
    target: str | Path,
    limits: Limits,
    kind: ArchiveKind | None = None,
    skip: SkipRule | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Extracted:
    """Check then extract `path` into the (new or empty) folder `target`.

    `skip` keeps members off the disk by their path and first bytes (a dataset writes only
    images: a non-image member costs no disk at all, whatever its size). `progress(done,
    total)` is called after each member (total: the members the first pass found).

    Raises an ArchiveError: NotAnArchive (not a zip or gzip), ArchiveTooLarge (entries, total
    size), ArchiveUnsafe (traversal, links, devices, compression ratio) or ArchiveInvalid
    (corrupt). On error `target` may hold partial output: the caller removes it.
    """
    path = Path(path)
    target = Path(target)
    kind = kind or detect_kind(path)
    if kind is None:
        raise NotAnArchive("upload a .zip or .tar.gz archive", reason="magic_bytes")
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    out = Extracted()
    budget = _Budget(limits)
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as archive:
                members = _scan_zip(archive, budget, out)
            files = _zip_files(path, members)
        else:
            members = _scan_tar(path, limits, budget, out)
            files = _tar_files(path, members)
        total = [0]
        for folder in out.folders:
            _target_path(target, folder).mkdir(parents=True, exist_ok=True)
        handled = 0
        for member, source in files:
            handled += 1
            if progress is not None:
                progress(handled - 1, len(members))
            dest = _target_path(target, member.path)
            head = source.read(HEAD_BYTES) if skip is not None else b""
            reason = skip(member.path, head) if skip is not None else None
            if reason is not None:
                if reason:
                    out.skipped.append(Skipped(member.path, reason))
                continue
            out.bytes += _copy(
                source, dest, member.size, member.path, total, limits.max_uncompressed_bytes, head
            )
            out.files += 1
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ArchiveInvalid(f"the archive is corrupt or truncated: {exc}") from None
    except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
        raise ArchiveInvalid(f"a file and a folder share a name: {exc.filename}") from None
    if handled < len(members):
        raise ArchiveInvalid("the archive changed while it was read")
    return out
