"""Serving throughput over real HTTP: dynamic batching on vs off, at several concurrencies.

    .venv/bin/python benchmarks/serve_speed.py                  # small-R26x0.5 at 128 px
    .venv/bin/python benchmarks/serve_speed.py --model BiT-M-R50x1
    .venv/bin/python benchmarks/serve_speed.py --quick          # smoke test (seconds)
    .venv/bin/python benchmarks/serve_speed.py --threads 2      # 2 torch threads per server

What runs: a random-weight artifact is saved (bitcore.artifacts.save_artifact) into the store of
a temporary BITSERVE_HOME with the embedded defaults (SQLite, migrated here) and registered as a
model row (tests.model_fixtures.publish_model: service.job_runs.finish_succeeded), as the
worker does after training. Then one
uvicorn server process per configuration serves `create_app(settings)` on a loopback socket
bound here (no port race):

    off      predict_max_batch_size=1    (every image is its own forward pass)
    on/d0    predict_max_batch_size=32   predict_max_queue_delay_ms=0  (take what is queued; the default)
    on/d2    predict_max_batch_size=32   predict_max_queue_delay_ms=2  (hold a lone request 2 ms)
    (--delays 0 2 20 adds on/d20, etc.)

All three servers are up for the whole run and the configurations are measured alternately
(for each concurrency, round by round: off, on/d0, on/d2, off, ...) so that load from other
processes on this shared machine hits them alike. The load generator (this process,
httpx.AsyncClient) keeps `concurrency` requests in flight until a fixed number has been sent,
one PNG image per request (multipart `files`, as a client sends it; the body is built once per
image so the client spends its CPU on HTTP only). Every response must be 200 and its top-5
labels and scores must match a bitcore Predictor run directly on the same image; otherwise the
script fails: a benchmark that measured error responses would look fast.

Columns: images/s (requests completed / wall time of the round, summed over rounds), latency
percentiles over all timed requests, the mean forward batch size (delta of the server's
bitserve_predict_batch_size histogram sum/count over the timed requests, from /metrics), server
CPU milliseconds per image (utime+stime of the server process from /proc, which a core held by
another process does not inflate), the same for this load-generating process (it shares the
cores), and images/s relative to `off` at the same concurrency.

Torch threads: each server process runs torch.set_num_threads(--threads), 1 by default. The two
cores of the development machine are shared by the server's event loop and decode threads, the
load generator and other processes; one intra-op thread leaves a core for the rest and avoids
OpenMP barrier stalls under contention (see RESULTS.md, "Prediction speed"). On a dedicated
serving machine set it to the cores the server has to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from loopback import Server, cpu_model  # benchmarks/ is on sys.path when run as a script
from loopback import start_server as loopback_server
from PIL import Image

from bitcore.models import create_model
from bitcore.predict import Predictor

NUM_CLASSES = 10
TOP_K = 5
NUM_IMAGES = 16  # distinct request images, used round-robin
IMAGE_SIZE = (160, 192)  # (height, width): decoded and resized to the crop by the server
SCORE_TOL = 1e-4  # batched vs single forward: same maths, different kernel blocking
BOUNDARY = "bitserve-bench-boundary"
STARTUP_TIMEOUT_S = 120.0
POINT_TIMEOUT_S = 600.0
BATCH_ON = 32  # the default predict_max_batch_size


def configs(delays: list[float], auth_cost: bool = False) -> dict[str, dict[str, Any]]:
    """Server settings by name: batching off, then on with each max queue delay (ms); with
    `auth_cost`, also batching on at the first delay without API keys (BITSERVE_AUTH=off)."""
    named: dict[str, dict[str, Any]] = {"off": {"predict_max_batch_size": 1}}
    for delay in delays:
        named[f"on/d{delay:g}"] = {
            "predict_max_batch_size": BATCH_ON,
            "predict_max_queue_delay_ms": delay,
        }
    if auth_cost:
        named[f"on/d{delays[0]:g}/no-auth"] = {**named[f"on/d{delays[0]:g}"], "auth": "off"}
    return named


# -- the server processes ----------------------------------------------------------------------


def serve(fd: int, home: str, overrides: dict[str, Any], threads: int) -> None:
    """In the child: uvicorn on the inherited listening socket, until terminated."""
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(home=Path(home), auto_migrate=False, **overrides)
    sock = socket.socket(fileno=fd)
    config = uvicorn.Config(create_app(settings), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


def start_server(name: str, home: Path, overrides: dict[str, Any], threads: int) -> Server:
    args = ["--serve-home", str(home), "--serve-settings", json.dumps(overrides)]
    return loopback_server(__file__, name, [*args, "--threads", str(threads)], STARTUP_TIMEOUT_S)


def batch_histogram(url: str) -> tuple[float, float]:
    """(sum, count) of the server's bitserve_predict_batch_size histogram."""
    values: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("bitserve_predict_batch_size_"):
            key, value = line.split()
            values[key] = float(value)
    return values["bitserve_predict_batch_size_sum"], values["bitserve_predict_batch_size_count"]


# -- the model and the images ------------------------------------------------------------------


def make_images(count: int) -> list[bytes]:
    """PNGs of smooth colour fields with stripes and noise: real, decodable, all different."""
    height, width = IMAGE_SIZE
    images = []
    for index in range(count):
        rng = np.random.default_rng(index)
        yy, xx = np.mgrid[0:height, 0:width]
        base = rng.uniform(40, 215, size=3)
        period = 4 + index % 7
        stripes = ((((yy if index % 2 else xx) // period) % 2) * 2.0 - 1.0)[..., None]
        pixels = base + 40.0 * stripes + rng.normal(0.0, 15.0, size=(height, width, 3))
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def multipart_body(index: int, data: bytes) -> bytes:
    head = (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="files"; filename="img{index}.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def setup_home(home: Path, model_name: str, crop: int) -> tuple[str, Path, str]:
    """Migrated SQLite + one registered random-weight model and a predict-scope API key;
    returns (model id, artifact dir, key)."""
    from service import api_keys
    from service.db import Database
    from service.settings import Settings
    from service.storage import Storage

    # The repository root (benchmarks/ is sys.path[0] when run as a script), for the fixture
    # that publishes a model as a finished job does.
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
    from tests.model_fixtures import publish_model

    settings = Settings(home=home)
    db = Database(settings.database_url)
    db.migrate()
    storage = Storage(settings.artifact_root)
    torch.manual_seed(0)
    model = create_model(model_name, NUM_CLASSES)  # random head: each image its own answer
    classes = [f"class{i}" for i in range(NUM_CLASSES)]
    model_id, _ = publish_model(db, storage, model, model_name, classes, crop)
    with db.sessionmaker() as session:
        key = api_keys.create_key(
            session, tenant_id="default", scopes=[api_keys.Scope.PREDICT], pepper=None
        ).token
    db.dispose()
    return model_id, storage.model_dir(model_id), key


# -- the load generator ------------------------------------------------------------------------


@dataclass
class Point:
    config: str
    concurrency: int
    requests: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    batch_sum: float = 0.0
    batch_count: float = 0.0
    cpu_seconds: float = 0.0
    client_cpu_seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else math.nan

    def percentile(self, q: int) -> float:
        cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return cuts[q - 1] * 1000.0

    @property
    def mean_batch(self) -> float:
        return self.batch_sum / self.batch_count if self.batch_count else math.nan


async def drive(
    url: str,
    path: str,
    bodies: list[bytes],
    count: int,
    concurrency: int,
    key: str,
    start: int = 0,
) -> tuple[float, list[float], list[tuple[int, int, bytes]]]:
    """Send `count` requests with `concurrency` in flight; (wall s, latencies, responses)."""
    headers = {
        "content-type": f"multipart/form-data; boundary={BOUNDARY}",
        "authorization": f"Bearer {key}",
    }
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    responses: list[tuple[int, int, bytes]] = []  # (image index, status, body)
    next_index = start
    stop = start + count

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(index: int) -> None:
            began = time.perf_counter()
            body = bodies[index % len(bodies)]
            response = await client.post(path, content=body, headers=headers)
            latencies.append(time.perf_counter() - began)
            responses.append((index % len(bodies), response.status_code, response.content))

        # Open the connections first (untimed, not counted): the timed run is steady state.
        await asyncio.gather(*(client.get("/healthz") for _ in range(concurrency)))

        async def worker() -> None:
            nonlocal next_index
            while next_index < stop:  # one event loop: no lock needed
                index = next_index
                next_index += 1
                await one(index)

        began = time.perf_counter()
        async with asyncio.timeout(POINT_TIMEOUT_S):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - began, latencies, responses


def check_responses(
    config: str, responses: list[tuple[int, int, bytes]], expected: list[list[tuple[str, float]]]
) -> None:
    """Every response 200 and equal to the direct Predictor's answer for its image."""
    bad = [(index, status, body[:300]) for index, status, body in responses if status != 200]
    if bad:
        raise SystemExit(f"{config}: {len(bad)} of {len(responses)} requests failed: {bad[:3]}")
    for index, _, body in responses:
        got = json.loads(body)["predictions"]
        if len(got) != 1:
            raise SystemExit(f"{config}: expected 1 prediction, got {len(got)}")
        ranked = [(item["label"], item["score"]) for item in got[0]["top_k"]]
        want = expected[index]
        labels_ok = [label for label, _ in ranked] == [label for label, _ in want]
        scores_ok = all(abs(a[1] - b[1]) <= SCORE_TOL for a, b in zip(ranked, want, strict=True))
        if not (labels_ok and scores_ok):
            raise SystemExit(f"{config}: image {index}: server said {ranked}, Predictor {want}")


# -- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # this process only checks answers and generates load
    images = make_images(NUM_IMAGES)
    bodies = [multipart_body(i, data) for i, data in enumerate(images)]
    with tempfile.TemporaryDirectory(prefix="bitserve-serve-bench-") as tmp:
        home = Path(tmp)
        model_id, artifact, key = setup_home(home, args.model, args.crop)
        predictor = Predictor.load(artifact, "cpu")
        expected = predictor.predict(images, top_k=TOP_K)
        path = f"/v1/models/{model_id}/predict?top_k={TOP_K}"
        servers: list[Server] = []
        try:
            for name, overrides in configs(args.delays, args.auth_cost).items():
                servers.append(start_server(name, home, overrides, args.threads))
            load_before = os.getloadavg()[0]
            # Warm-up: model load + warm-up forward, then the batch shapes each level produces
            # (oneDNN builds kernels per input shape on first use).
            for server in servers:
                for level in args.concurrency:
                    _, _, responses = asyncio.run(
                        drive(server.url, path, bodies, args.warmup + level, level, key)
                    )
                    check_responses(server.name, responses, expected)
            points = {(s.name, c): Point(s.name, c) for s in servers for c in args.concurrency}
            per_round = math.ceil(args.requests / args.rounds)
            for level in args.concurrency:
                for round_index in range(args.rounds):
                    order = servers if round_index % 2 == 0 else servers[::-1]
                    for server in order:
                        point = points[(server.name, level)]
                        sum0, count0 = batch_histogram(server.url)
                        cpu0, client0 = server.cpu_seconds(), time.process_time()
                        seconds, latencies, responses = asyncio.run(
                            drive(
                                server.url,
                                path,
                                bodies,
                                per_round,
                                level,
                                key,
                                start=point.requests,
                            )
                        )
                        cpu1, client1 = server.cpu_seconds(), time.process_time()
                        sum1, count1 = batch_histogram(server.url)
                        check_responses(server.name, responses, expected)
                        point.requests += len(responses)
                        point.seconds += seconds
                        point.latencies += latencies
                        point.batch_sum += sum1 - sum0
                        point.batch_count += count1 - count0
                        point.cpu_seconds += cpu1 - cpu0
                        point.client_cpu_seconds += client1 - client0
            load_after = os.getloadavg()[0]
        finally:
            for server in servers:
                server.stop()
    print_table(args, points, load_before, load_after)


def print_table(
    args: argparse.Namespace,
    points: dict[tuple[str, int], Point],
    load_before: float,
    load_after: float,
) -> None:
    print(
        f"\n{args.model} at {args.crop} px, {NUM_CLASSES} classes, {cpu_model()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, server torch threads {args.threads}, "
        f"{args.requests} timed requests per point in {args.rounds} alternated rounds, "
        f"load average {load_before:.1f} -> {load_after:.1f}\n"
    )
    header = (
        "| config | concurrency | images/s | p50 ms | p95 ms | p99 ms | mean batch "
        "| server CPU ms/image | client CPU ms/image | images/s vs off |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for level in args.concurrency:
        baseline = points[("off", level)].images_per_s
        for name in configs(args.delays, args.auth_cost):
            p = points[(name, level)]
            ratio = p.images_per_s / baseline
            print(
                f"| {name} | {level} | {p.images_per_s:.1f} | {p.percentile(50):.1f} "
                f"| {p.percentile(95):.1f} | {p.percentile(99):.1f} | {p.mean_batch:.2f} "
                f"| {1000.0 * p.cpu_seconds / p.requests:.1f} "
                f"| {1000.0 * p.client_cpu_seconds / p.requests:.1f} | {ratio:.2f}x |"
            )
    total = sum(p.requests for p in points.values())
    print(f"\nall {total} timed responses were 200 and matched a direct Predictor (top-{TOP_K})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="small-R26x0.5", help="registry architecture name")
    parser.add_argument("--crop", type=int, default=128, help="input size of the artifact")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per point")
    parser.add_argument("--rounds", type=int, default=4, help="alternated rounds per point")
    parser.add_argument("--warmup", type=int, default=16, help="untimed requests per level")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4, 16], help="requests in flight"
    )
    parser.add_argument(
        "--delays",
        type=float,
        nargs="+",
        default=[0.0, 2.0],
        help="predict_max_queue_delay_ms values to measure with batching on (default 0 2)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--quick", action="store_true", help="smoke test: few requests")
    parser.add_argument(
        "--auth-cost", action="store_true", help="also measure without API keys (AUTH=off)"
    )
    parser.add_argument("--serve-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-home", help=argparse.SUPPRESS)
    parser.add_argument("--serve-settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fd is not None:
        serve(args.serve_fd, args.serve_home, json.loads(args.serve_settings), args.threads)
        return
    if args.quick:
        args.requests, args.rounds, args.warmup = 20, 1, 2
    if (
        args.requests < 1
        or args.rounds < 1
        or min(args.concurrency) < 1
        or args.threads < 1
        or min(args.delays) < 0
    ):
        parser.error("--requests, --rounds, --concurrency, --threads must be >= 1, --delays >= 0")
    run(args)


if __name__ == "__main__":
    main()
