"""Receive a multipart upload straight to a temp file, with the byte cap enforced as it streams.

The body is read through service.request_bodies.capped_stream (the one capped reader: each chunk
is counted before it is used, chunked bodies included) and parsed with python-multipart's
streaming MultipartParser, whose callbacks (`_FormWriter`) write the file part straight into a
temp file under the directory the caller gives (the artifact store's tmp/), so nothing is held
whole in memory and the bytes are written once, where the dataset will be extracted from.

Why not Starlette's MultiPartParser over the same capped_stream, as predict requests use:
measured with benchmarks/upload_speed.py (uvicorn on loopback, 2 shared cores; RESULTS.md,
"Receiving uploads"), it took 1.65-1.9x the time of this module for a 50 MB file and 2.3-2.7x
for 500 MB (e.g. 378 vs 902 MB/s), with 1.8-3.1x the CPU, and wrote every byte twice. Starlette
spools a file part into an anonymous SpooledTemporaryFile in the system temp dir (1 MiB in
memory, then one thread-pool hop per chunk), which cannot be renamed into the store, so the
route would copy it there: 500 MB more written per 500 MB upload (0.25-0.8 s), and the whole
upload held in the system temp dir too (a tmpfs there would hold it in RAM). Its parse alone,
before the copy, was still 1.25-1.9x slower. Memory was flat in both (at most the 1 MiB spool).

The temp file is removed when the `async with` block ends, whatever happened (errors, client
disconnects), so the caller only has to consume it inside the block.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.domain_errors import (
    InsufficientStorage,
    InvalidRequest,
    MalformedRequest,
    TooLarge,
    UnsupportedMedia,
)
from service.request_bodies import QuotaCap, capped_stream
from service.storage import disk_full_as

MAX_FIELD_BYTES = 4096  # plain form fields (name, ...): small by nature
# A part's headers (Content-Disposition, Content-Type): a few hundred bytes in practice.
MAX_PART_HEADER_BYTES = 8192


@dataclass
class Upload:
    path: Path  # the temp file holding the file part
    filename: str | None  # as the client named it: informative only, never a path we use
    size: int  # bytes of the file part
    fields: dict[str, str] = field(default_factory=dict)


class _FormWriter:
    """python-multipart callbacks: the file part goes to `sink`, small fields to memory."""

    def __init__(self, sink: IO[bytes], file_field: str, fields: frozenset[str]) -> None:
        self.sink = sink
        self.file_field = file_field
        self.known_fields = fields  # any other part is refused: parts are bounded by these
        self.file_seen = False
        self.filename: str | None = None
        self.size = 0
        self.fields: dict[str, str] = {}
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._target: str | None = None  # "file", a field name, or None (ignored part)
        self._header_bytes = 0
        self._buffer = bytearray()
        self.complete = False  # the closing boundary was seen

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._header_bytes = 0
        self._headers = {}
        self._target = None
        self._buffer = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_value += data[start:end]

    def _count_header(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise TooLarge(
                "payload_too_large",
                f"a multipart part's headers are over {MAX_PART_HEADER_BYTES} bytes",
                {"limit_bytes": MAX_PART_HEADER_BYTES},
            )

    def _header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise MalformedRequest("malformed_request", "a multipart part lacks its form-data name")
        name = options[b"name"].decode("utf-8", "replace")
        if name == self.file_field:
            if self.file_seen:
                raise MalformedRequest("malformed_request", f"more than one {name!r} part")
            self.file_seen = True
            self._target = "file"
            if b"filename" in options:
                self.filename = options[b"filename"].decode("utf-8", "replace")[:255]
        elif name in self.known_fields:
            if name in self.fields:
                raise InvalidRequest(
                    "invalid_request", f"more than one {name!r} part", {"field": name}
                )
            self._target = name
        else:
            known = ", ".join(sorted({self.file_field, *self.known_fields}))
            raise InvalidRequest(
                "invalid_request",
                f"unknown form field {name[:100]!r}: the form takes {known}",
                {"field": name[:100]},
            )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._target == "file":
            # A page-cache write of one network chunk (<= 64 KiB): microseconds, so it stays
            # on the event loop rather than paying a thread hop per chunk.
            self.sink.write(data[start:end])
            self.size += end - start
        elif self._target is not None:
            self._buffer += data[start:end]
            if len(self._buffer) > MAX_FIELD_BYTES:
                raise TooLarge("payload_too_large", f"form field {self._target!r} is over 4 KiB")

    def _end(self) -> None:
        self.complete = True

    def _part_end(self) -> None:
        if self._target not in (None, "file"):
            assert self._target is not None
            self.fields[self._target] = self._buffer.decode("utf-8", "replace")


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise UnsupportedMedia(
            "unsupported_media_type",
            "send the archive as multipart/form-data with a `file` part",
        )
    return options[b"boundary"]


@asynccontextmanager
async def receive_upload(
    request: Request,
    tmp_dir: Path,
    *,
    max_bytes: int,
    quota: QuotaCap | None = None,
    file_field: str = "file",
    fields: frozenset[str] = frozenset({"name"}),
) -> AsyncIterator[Upload]:
    """Stream the multipart body of `request`; yield the file part as a temp file.

    Raises UnsupportedMedia (not multipart), TooLarge payload_too_large (Content-Length or
    the streamed bytes over `max_bytes`), `quota.error()` (over `quota.limit` bytes: the
    whole body counts, multipart framing included), MalformedRequest, InvalidRequest (no
    file part; a part that is not the file or one of `fields`; a field twice),
    InsufficientStorage (the disk of `tmp_dir` is full).
    """
    boundary = _boundary(request)
    body = capped_stream(request, max_bytes, quota=quota)
    with disk_full_as("the upload"):
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=tmp_dir)
    path = Path(name)
    try:
        # A full disk (the write of a chunk, or the flush at close) is a 507, and the temp
        # file goes in `finally`: the rest of the body is never read.
        with disk_full_as("the upload"), os.fdopen(fd, "wb") as sink:
            writer = _FormWriter(sink, file_field, fields)
            parser = MultipartParser(boundary, writer.callbacks())  # type: ignore[arg-type]
            try:
                async for chunk in body:
                    parser.write(chunk)
                parser.finalize()
            except MultipartParseError as exc:
                raise MalformedRequest("malformed_request", f"bad multipart body: {exc}") from None
        if not writer.complete:
            raise MalformedRequest(
                "malformed_request", "the multipart body ended before its closing boundary"
            )
        if not writer.file_seen:
            raise InvalidRequest(
                "invalid_request",
                f"the form has no {file_field!r} part",
                {"field": file_field},
            )
        yield Upload(path=path, filename=writer.filename, size=writer.size, fields=writer.fields)
    finally:
        with suppress(OSError):
            path.unlink()


def check_free_disk(directory: Path, declared: str | None, margin: int) -> None:
    """InsufficientStorage (507) unless the disk of `directory` has room for a body of
    `declared` bytes (its Content-Length, if any) plus `margin`: refused before a byte is read,
    rather than at ENOSPC halfway through, with every other writer of that disk starved."""
    body = int(declared) if declared is not None and declared.isdigit() else 0
    free = shutil.disk_usage(directory).free
    if free < body + margin:
        raise InsufficientStorage(
            "insufficient_storage",
            "the server has too little free disk to accept this upload; try again once space "
            "is freed",
            {"needed_bytes": body + margin, "free_bytes": free},
        )
