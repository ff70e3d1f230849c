"""Idle connections and job event streams against a real `bitserve api`: do /healthz and a
dataset listing stay fast?

    .venv/bin/python benchmarks/connections.py                          # 2,000 idle, 1,000 SSE
    .venv/bin/python benchmarks/connections.py --idle 200 --streams 100 --probes 50 --json
    .venv/bin/python benchmarks/connections.py --database-url postgresql+psycopg://... \\
        --broker-url redis://localhost:6379/0

What runs: `python -m service.cli api` (as `bitserve api` runs: its connection cap, header
timeout and shared job-events notifier) in a child process, on the embedded SQLite database and
broker under a fresh temporary BITSERVE_HOME unless URLs are given, with BITSERVE_AUTH=off
(loopback), BITSERVE_MAX_STREAMS_PER_KEY raised to the number of streams (this measures the
load, not the per-key cap, which would refuse past 20) and BITSERVE_TENANT_MAX_ACTIVE_JOBS to
--jobs. One dataset (6 small PNGs, ingested by a `bitserve worker --queues ingest` child that is
stopped once it is ready) and --jobs queued jobs (no train worker: they stay queued) are made
first.

Then, in this process (asyncio, raw sockets):
  idle     --idle connections that send nothing. The server closes each after its header
           timeout (408); it is opened again at once, as an attacker holding connections would.
  streams  --streams GET /v1/jobs/{id}/events streams spread over the jobs, held open; each
           must have received its first `status` event before the measurement starts.
and in a thread, with its own kept-alive connection, --probes requests each of GET /healthz and
GET /v1/datasets, alternated, 20 ms apart: first with nothing else open (baseline), then with
all the connections above open (loaded). Latency is the client's wall time per request.

Printed: a table (p50, p95, max, errors per probe and phase), the server's open descriptors and
RSS under load, idle connections the server closed (and that were reopened), streams dropped.
--json prints one JSON object instead (the test of this script reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120.0
OPEN_TIMEOUT_S = 180.0
PROBE_GAP_S = 0.02
PROBES = ("/healthz", "/v1/datasets")


@dataclass
class Load:
    """What the connections held open saw."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    idle_open: int = 0
    idle_closed_by_server: int = 0
    idle_refused: int = 0
    streams_open: int = 0
    streams_dropped: int = 0
    stream_errors: list[str] = field(default_factory=list)


def raise_own_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed and soft < hard:
        soft = hard if hard != resource.RLIM_INFINITY else needed
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft < needed:
        raise SystemExit(f"ulimit -n is {soft}: this run needs about {needed} descriptors")
    return soft


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_env(args: argparse.Namespace, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BITSERVE_HOME=str(home),
        BITSERVE_AUTH="off",
        BITSERVE_MAX_STREAMS_PER_KEY=str(max(20, args.streams)),
        BITSERVE_TENANT_MAX_ACTIVE_JOBS=str(max(4, args.jobs)),
        BITSERVE_TRAIN_QUEUE=f"train-bench-{os.getpid()}",  # no worker consumes it
    )
    if args.database_url:
        env["BITSERVE_DATABASE_URL"] = args.database_url
    if args.broker_url:
        env["BITSERVE_BROKER_URL"] = args.broker_url
    return env


def start_api(args: argparse.Namespace, home: Path, port: int) -> subprocess.Popen[bytes]:
    env = bench_env(args, home)
    command = [sys.executable, "-m", "service.cli", "api", "--port", str(port)]
    log = open(home / "api.log", "wb")  # noqa: SIM115 (the child holds it)
    cwd = Path(args.source).resolve() if args.source else REPO
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bitserve api exited: see {home / 'api.log'}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        time.sleep(0.2)
    process.kill()
    raise SystemExit("bitserve api did not start")


def tiny_dataset() -> bytes:
    """A zip of two classes of three 32 px PNGs each."""
    from PIL import Image

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for label, colour in (("red", (200, 10, 10)), ("blue", (10, 10, 200))):
            for index in range(3):
                png = io.BytesIO()
                Image.new("RGB", (32, 32), (colour[0], colour[1] + index * 20, colour[2])).save(
                    png, "PNG"
                )
                archive.writestr(f"data/{label}/{index}.png", png.getvalue())
    return out.getvalue()


def ingested_dataset(args: argparse.Namespace, home: Path, http: httpx.Client) -> str:
    """Upload the tiny dataset and wait until an ingest worker (`bitserve worker --queues
    ingest`, stopped after) made it ready: jobs are only taken on a ready dataset."""
    answer = http.post("/v1/datasets", files={"file": ("d.zip", tiny_dataset())})
    answer.raise_for_status()  # 202: stored, processing
    dataset_id = str(answer.json()["id"])
    command = [sys.executable, "-m", "service.cli", "worker", "--queues", "ingest"]
    log = open(home / "ingest.log", "wb")  # noqa: SIM115 (the child holds it)
    cwd = Path(args.source).resolve() if args.source else REPO
    worker = subprocess.Popen(command, cwd=cwd, env=bench_env(args, home), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            dataset = http.get(f"/v1/datasets/{dataset_id}").json()
            if dataset["status"] == "ready":
                return dataset_id
            if dataset["status"] != "processing" or time.monotonic() > deadline:
                raise SystemExit(f"dataset not ingested ({dataset}): see {home / 'ingest.log'}")
            time.sleep(0.2)
    finally:
        worker.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(30)
        if worker.poll() is None:
            worker.kill()


def make_jobs(args: argparse.Namespace, home: Path, base: str, count: int) -> list[str]:
    with httpx.Client(base_url=base, timeout=60) as http:
        dataset_id = ingested_dataset(args, home, http)
        body = {"dataset_id": dataset_id, "base_model": "tiny-R10x0.25"}
        jobs = []
        for _ in range(count):
            answer = http.post("/v1/jobs", json=body)
            answer.raise_for_status()
            jobs.append(answer.json()["id"])
    return jobs


async def hold_idle(port: int, load: Load) -> None:
    while not load.stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            load.idle_refused += 1
            await asyncio.sleep(0.1)
            continue
        load.idle_open += 1
        try:
            read = asyncio.ensure_future(reader.read())  # b"" (or a 408) once the server closes
            stop = asyncio.ensure_future(load.stop.wait())
            done, _ = await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
            if read in done:
                load.idle_closed_by_server += 1
            for task in (read, stop):
                task.cancel()
        except OSError:
            load.idle_closed_by_server += 1
        finally:
            load.idle_open -= 1
            writer.close()


async def hold_stream(port: int, job_id: str, load: Load, opened: asyncio.Event) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        status_line = await reader.readline()
        if b" 200 " not in status_line:
            load.stream_errors.append(status_line.decode(errors="replace").strip())
            opened.set()
            return
        while not (line := await reader.readline()).startswith(b"event: status"):
            if not line:
                raise ConnectionError("closed before the first event")
        load.streams_open += 1
        opened.set()
        read = asyncio.ensure_future(_drain(reader))
        stop = asyncio.ensure_future(load.stop.wait())
        done, _ = await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        if read in done:
            load.streams_dropped += 1
        for task in (read, stop):
            task.cancel()
        writer.close()
    except (OSError, ConnectionError) as exc:
        load.stream_errors.append(repr(exc))
        opened.set()


async def _drain(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


def probe(base: str, count: int, max_seconds: float) -> dict[str, dict[str, Any]]:
    """count requests of each probe path, alternated, on one kept-alive connection (fewer if
    max_seconds pass first: a slow server)."""
    times: dict[str, list[float]] = {path: [] for path in PROBES}
    errors: dict[str, list[int]] = {path: [] for path in PROBES}
    deadline = time.monotonic() + max_seconds
    with httpx.Client(base_url=base, timeout=60) as http:
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            for path in PROBES:
                started = time.perf_counter()
                try:
                    status = http.get(path).status_code
                except httpx.TransportError:
                    status = 0
                times[path].append(time.perf_counter() - started)
                if status != 200:
                    errors[path].append(status)
                time.sleep(PROBE_GAP_S)
    return {path: summarize(times[path], errors[path]) for path in PROBES}


def summarize(seconds: list[float], errors: list[int]) -> dict[str, Any]:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(p95, 2),
        "max_ms": round(ms[-1], 2),
        "errors": errors,
    }


def proc_reading(pid: int) -> dict[str, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) // 1024
    return {"open_fds": fds, "rss_mib": rss}


async def under_load(args: argparse.Namespace, port: int, jobs: list[str]) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    load = Load()
    opened = [asyncio.Event() for _ in range(args.streams)]
    started = time.monotonic()
    tasks = [asyncio.create_task(hold_idle(port, load)) for _ in range(args.idle)]
    tasks += [
        asyncio.create_task(hold_stream(port, jobs[i % len(jobs)], load, opened[i]))
        for i in range(args.streams)
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), OPEN_TIMEOUT_S)
    while load.idle_open < args.idle and time.monotonic() - started < OPEN_TIMEOUT_S:
        await asyncio.sleep(0.05)
    opened_s = time.monotonic() - started
    held = {"idle_open": load.idle_open, "streams_open": load.streams_open}
    # The probes run in a thread (own connection, blocking client), the holders here.
    loaded = await asyncio.to_thread(probe, base, args.probes, args.max_probe_seconds)
    server = proc_reading(args.server_pid)
    held_after = {"idle_open": load.idle_open, "streams_open_after": load.streams_open}
    load.stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "loaded": loaded,
        "opened_seconds": round(opened_s, 1),
        "held_at_start": held,
        "held_at_end": held_after,
        "idle_closed_by_server": load.idle_closed_by_server,
        "idle_refused": load.idle_refused,
        "streams_dropped": load.streams_dropped,
        "stream_errors": load.stream_errors[:5],
        "stream_error_count": len(load.stream_errors),
        "server": server,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_own_fd_limit(args.idle + args.streams + 256)
    with tempfile.TemporaryDirectory(prefix="bench-conns-") as tmp:
        home = Path(tmp)
        port = free_port()
        api = start_api(args, home, port)
        try:
            base = f"http://127.0.0.1:{port}"
            jobs = make_jobs(args, home, base, args.jobs)
            baseline = probe(base, args.probes, args.max_probe_seconds)
            baseline_server = proc_reading(api.pid)
            args.server_pid = api.pid
            result = asyncio.run(under_load(args, port, jobs))
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            return {
                "idle": args.idle,
                "streams": args.streams,
                "jobs": len(jobs),
                "baseline": baseline,
                "baseline_server": baseline_server,
                "client_fd_limit": soft,
                "cpu": _cpu(),
                **result,
            }
        finally:
            api.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                api.wait(30)
            if api.poll() is None:
                api.kill()


def _cpu() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{os.cpu_count()} cores"


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{result['idle']} idle connections, {result['streams']} event streams over "
        f"{result['jobs']} jobs; {result['cpu']}; client ulimit -n {result['client_fd_limit']}"
    )
    print("\n| phase | probe | n | p50 ms | p95 ms | max ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for phase in ("baseline", "loaded"):
        for path, row in result[phase].items():
            print(
                f"| {phase} | GET {path} | {row['n']} | {row['p50_ms']} | {row['p95_ms']} | "
                f"{row['max_ms']} | {len(row['errors'])} |"
            )
    server, before = result["server"], result["baseline_server"]
    print(
        f"\nopened in {result['opened_seconds']} s; held at start {result['held_at_start']}, "
        f"at end {result['held_at_end']}\n"
        f"server: {before['open_fds']} -> {server['open_fds']} open descriptors, "
        f"{before['rss_mib']} -> {server['rss_mib']} MiB RSS\n"
        f"idle connections closed by the server (header timeout) and reopened: "
        f"{result['idle_closed_by_server']}; refused: {result['idle_refused']}\n"
        f"streams dropped: {result['streams_dropped']}; stream errors: "
        f"{result['stream_error_count']} {result['stream_errors']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle", type=int, default=2000, help="idle connections held")
    parser.add_argument("--streams", type=int, default=1000, help="event streams held")
    parser.add_argument("--jobs", type=int, default=10, help="jobs the streams follow")
    parser.add_argument("--probes", type=int, default=400, help="requests per probe and phase")
    parser.add_argument(
        "--max-probe-seconds", type=float, default=120.0, help="stop probing a phase after this"
    )
    parser.add_argument("--database-url", help="PostgreSQL instead of the embedded SQLite")
    parser.add_argument("--broker-url", help="Redis instead of the embedded broker")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--source", help="serve the `service` package of this checkout (e.g. an older commit)"
    )
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    # SIGTERM (e.g. `timeout`): unwind, so the server child is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
