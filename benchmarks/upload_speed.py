"""Receiving a large multipart upload: service.uploads vs Starlette's MultiPartParser.

    .venv/bin/python benchmarks/upload_speed.py             # 50 MB and 500 MB, 3 runs (~20 s)
    .venv/bin/python benchmarks/upload_speed.py --quick     # 5 MB and 20 MB, 1 run (seconds)
    .venv/bin/python benchmarks/upload_speed.py --sizes 200 --runs 5 --dir /work/store/tmp

What runs: one uvicorn server process (its defaults, as `bitserve api` runs it: httptools and
uvloop) serves a Starlette app on a loopback socket bound here, with two routes that receive the
same upload, each ending with the file part's bytes in a file under the target directory
(--dir, a fresh temporary directory by default), as the dataset route needs them:

    current    service.uploads.receive_upload: python-multipart's MultipartParser with the
               module's own callbacks, over request_bodies.capped_stream, writing each chunk of
               the file part straight into a temp file under the directory.
    starlette  starlette.formparsers.MultiPartParser over the same capped_stream
               (max_files=1, max_fields=16, max_part_size=4096: the limits the upload route
               would set). Starlette spools a file part into a SpooledTemporaryFile (1 MiB in
               memory, then an anonymous file in the system temp dir, with one thread-pool hop
               per chunk once rolled to disk); the spooled file is then copied into a temp file
               under the directory in the thread pool (os.copy_file_range: in the kernel, no
               user-space buffer), since an anonymous spool file cannot be renamed there.

The client (this process, httpx) streams the body: one `file` part of random bytes (a buffer
generated once) and a small `name` field, 1 MiB per write, with Content-Length, as a client
sending a file does. Both routes are measured alternately in each run (current, starlette; then
reversed). After each request the server keeps a hard link to the received file (made inside
the handler, untimed by the server, a metadata operation) and this process checks its SHA-256
against the bytes sent, then removes it: a benchmark that measured a wrong answer would look
fast.

Columns (medians over the runs): wall seconds from the first byte sent to the response
received; MB/s = size / that (MB = 10^6 bytes); server CPU seconds (utime + stime of the server
process from /proc, which waiting for a core does not inflate); peak RSS growth of the server
process (VmHWM after the request minus VmRSS before it, the high-water mark being reset with
/proc/PID/clear_refs before each request); MB written by the server (wchar of /proc/PID/io:
bytes passed to write/copy syscalls, sockets excluded) and the extra over the file's size
(temp copies); for `starlette`, the seconds of the copy step alone.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from loopback import Server, cpu_model  # benchmarks/ is on sys.path when run as a script
from loopback import start_server as loopback_server

MB = 1_000_000
CHUNK = 1 << 20  # client write size
BOUNDARY = "bitserve-upload-bench-boundary"
STARTUP_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 600.0
ROUTES = ("current", "starlette")


# -- the server process ------------------------------------------------------------------------


def serve(fd: int, target: str, keep: str) -> None:
    """In the child: uvicorn (its defaults) on the inherited socket, until terminated."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.formparsers import MultiPartParser
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from service.request_bodies import capped_stream
    from service.uploads import MAX_FIELD_BYTES, Upload, receive_upload

    target_dir, keep_dir = Path(target), Path(keep)
    max_bytes = 2 * 1024**3  # BITSERVE_MAX_UPLOAD_BYTES' default

    def copy_into(src: int, dst: int) -> None:
        offset = 0
        while True:
            copied = os.copy_file_range(src, dst, 1 << 30, offset, offset)
            if copied == 0:
                return
            offset += copied

    @asynccontextmanager
    async def receive_upload_starlette(
        request: Request, tmp_dir: Path, *, max_bytes: int, file_field: str = "file"
    ) -> AsyncIterator[Upload]:
        parser = MultiPartParser(
            request.headers,
            capped_stream(request, max_bytes),
            max_files=1,
            max_fields=16,
            max_part_size=MAX_FIELD_BYTES,
        )
        form = await parser.parse()
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=tmp_dir)
        path = Path(name)
        try:
            part = form.get(file_field)
            if part is None or isinstance(part, str):
                raise RuntimeError(f"no {file_field!r} file part")
            began = time.perf_counter()
            await run_in_threadpool(copy_into, part.file.fileno(), fd)
            request.state.copy_s = time.perf_counter() - began
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            yield Upload(path=path, filename=part.filename, size=part.size or 0, fields=fields)
        finally:
            os.close(fd)
            await form.close()
            with suppress(OSError):
                path.unlink()

    receivers = {"current": receive_upload, "starlette": receive_upload_starlette}

    async def upload(request: Request) -> JSONResponse:
        receive = receivers[request.path_params["route"]]
        request.state.copy_s = 0.0
        async with receive(request, target_dir, max_bytes=max_bytes) as received:
            kept = keep_dir / uuid.uuid4().hex
            os.link(received.path, kept)  # for the client's check; the temp file goes as usual
            answer = {
                "kept": str(kept),
                "size": received.size,
                "name": received.fields.get("name"),
                "copy_s": request.state.copy_s,
            }
        return JSONResponse(answer)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/upload/{route}", upload, methods=["POST"]),
        ]
    )
    sock = socket.socket(fileno=fd)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


def start_server(target: Path, keep: Path) -> Server:
    args = ["--serve-target", str(target), "--serve-keep", str(keep)]
    return loopback_server(__file__, "upload", args, STARTUP_TIMEOUT_S)


# -- the client --------------------------------------------------------------------------------


@dataclass
class Sample:
    wall_s: float
    cpu_s: float
    rss_growth_mib: float
    peak_rss_mib: float
    written_mb: float
    copy_s: float


@dataclass
class Point:
    route: str
    size: int  # bytes of the file part
    samples: list[Sample] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(getattr(s, name) for s in self.samples)

    @property
    def mb_per_s(self) -> float:
        return self.size / MB / self.median("wall_s")


def body_parts() -> tuple[bytes, bytes]:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbench\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="data.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head, f"\r\n--{BOUNDARY}--\r\n".encode()


def upload_once(
    client: httpx.Client, server: Server, route: str, data: memoryview, size: int, digest: str
) -> Sample:
    head, tail = body_parts()

    def body() -> Iterator[bytes]:
        yield head
        for start in range(0, size, CHUNK):
            yield bytes(data[start : min(start + CHUNK, size)])
        yield tail

    headers = {
        "content-type": f"multipart/form-data; boundary={BOUNDARY}",
        "content-length": str(len(head) + size + len(tail)),
    }
    server.reset_peak()
    rss0, cpu0, io0 = server.memory_kib("VmRSS"), server.cpu_seconds(), server.io()
    began = time.perf_counter()
    response = client.post(f"/upload/{route}", content=body(), headers=headers)
    wall = time.perf_counter() - began
    hwm, cpu1, io1 = server.memory_kib("VmHWM"), server.cpu_seconds(), server.io()
    if response.status_code != 200:
        raise SystemExit(f"{route}: HTTP {response.status_code}: {response.text[:300]}")
    answer = response.json()
    kept = Path(answer["kept"])
    try:
        if answer["size"] != size or answer["name"] != "bench":
            raise SystemExit(f"{route}: the server saw {answer}, expected size {size}")
        hasher = hashlib.sha256()
        with kept.open("rb") as fh:
            while block := fh.read(CHUNK * 8):
                hasher.update(block)
        if hasher.hexdigest() != digest:
            raise SystemExit(f"{route}: the received file differs from the bytes sent")
    finally:
        kept.unlink()
    return Sample(
        wall_s=wall,
        cpu_s=cpu1 - cpu0,
        rss_growth_mib=(hwm - rss0) / 1024,
        peak_rss_mib=hwm / 1024,
        written_mb=(io1["wchar"] - io0["wchar"]) / MB,
        copy_s=float(answer["copy_s"]),
    )


def run(args: argparse.Namespace) -> None:
    sizes = [int(mb * MB) for mb in args.sizes]
    began = time.perf_counter()
    data = memoryview(os.urandom(max(sizes)))
    digests = {size: hashlib.sha256(data[:size]).hexdigest() for size in sizes}
    with tempfile.TemporaryDirectory(prefix="bitserve-upload-bench-", dir=args.dir) as tmp:
        target, keep = Path(tmp) / "tmp", Path(tmp) / "kept"
        target.mkdir()
        keep.mkdir()
        server = start_server(target, keep)
        points = {(route, size): Point(route, size) for size in sizes for route in ROUTES}
        load_before = os.getloadavg()[0]
        try:
            with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as client:
                for route in ROUTES:  # warm-up: imports, the thread pool, first-use paths
                    upload_once(client, server, route, data, sizes[0], digests[sizes[0]])
                for run_index in range(args.runs):
                    order = ROUTES if run_index % 2 == 0 else ROUTES[::-1]
                    for size in sizes:
                        for route in order:
                            sample = upload_once(client, server, route, data, size, digests[size])
                            points[(route, size)].samples.append(sample)
                            if leftovers := list(target.iterdir()):
                                raise SystemExit(f"{route}: temp files left: {leftovers}")
            load_after = os.getloadavg()[0]
        finally:
            server.stop()
    print_table(args, points, sizes, load_before, load_after, time.perf_counter() - began)


def print_table(
    args: argparse.Namespace,
    points: dict[tuple[str, int], Point],
    sizes: list[int],
    load_before: float,
    load_after: float,
    total_s: float,
) -> None:
    print(
        f"\n{cpu_model()}, {os.cpu_count()} CPUs, medians of {args.runs} alternated runs, "
        f"load average {load_before:.1f} -> {load_after:.1f}, {total_s:.0f} s in all\n"
    )
    header = (
        "| receiver | file MB | wall s | MB/s | time vs current | server CPU s "
        "| peak RSS growth MiB | server peak RSS MiB | MB written by server | extra MB written "
        "| copy step s |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for size in sizes:
        baseline = points[("current", size)].median("wall_s")
        for route in ROUTES:
            p = points[(route, size)]
            written = p.median("written_mb")
            print(
                f"| {route} | {size / MB:g} | {p.median('wall_s'):.3f} | {p.mb_per_s:.0f} "
                f"| {p.median('wall_s') / baseline:.2f}x | {p.median('cpu_s'):.3f} "
                f"| {p.median('rss_growth_mib'):.1f} | {p.median('peak_rss_mib'):.0f} "
                f"| {written:.0f} "
                f"| {written - size / MB:.0f} | {p.median('copy_s'):.3f} |"
            )
    print("\nwall s of each run:")
    for (route, size), p in points.items():
        runs = ", ".join(f"{s.wall_s:.3f}" for s in p.samples)
        peak = max(s.rss_growth_mib for s in p.samples)
        print(f"  {route:9} {size / MB:>6g} MB: {runs}  (peak RSS growth max {peak:.1f} MiB)")
    print(f"\nall {sum(len(p.samples) for p in points.values())} received files matched (SHA-256)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=[50, 500], help="file sizes, MB (10^6 bytes)"
    )
    parser.add_argument("--runs", type=int, default=3, help="alternated runs per size")
    parser.add_argument(
        "--dir", help="where the target (and kept) files go; the system temp dir by default"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 5 and 20 MB, 1 run")
    parser.add_argument("--serve-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-target", help=argparse.SUPPRESS)
    parser.add_argument("--serve-keep", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fd is not None:
        serve(args.serve_fd, args.serve_target, args.serve_keep)
        return
    if args.quick:
        args.sizes, args.runs = [5, 20], 1
    if args.runs < 1 or min(args.sizes) <= 0:
        parser.error("--runs must be >= 1 and --sizes > 0")
    run(args)


if __name__ == "__main__":
    main()
