"""Serving throughput over real HTTP: dynamic batching on vs off, at several concurrencies.

    .venv/bin/python benchmarks/serve_speed.py                  # small-R26x0.5 at 128 px
    .venv/bin/python benchmarks/serve_speed.py --model BiT-M-R50x1
    .venv/bin/python benchmarks/serve_speed.py --quick          # smoke test (seconds)
    .venv/bin/python benchmarks/serve_speed.py --threads 2      # 2 torch threads per server
    .venv/bin/python benchmarks/serve_speed.py --model BiT-M-R50x1 --image-format jpeg \
        --image-size 128 --peer litserve --concurrency 1 16 --delays 0   # issue 13's peer run

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

Peers (--peer litserve, --peer fastapi; benchmarks/serve_peers.py): the same artifact served
by another stack in its own process on its own loopback socket. `litserve` is a LitServe LitAPI
as its users write one: eager PyTorch (Predictor.load(runtime="torch"), WS folded), decode and
preprocess in decode_request, LitServe's dynamic batching (max_batch_size=16,
batch_timeout=5 ms), one inference worker. `fastapi` is a plain FastAPI endpoint: one forward
per request. They get the very same multipart request (only the path is /predict) and must give
the same answers.

All servers are up for the whole run and are measured alternately (for each concurrency, round
by round: off, on/d0, on/d2, litserve, then reversed, ...) so that load from other processes on
this shared machine hits them alike. The load generator (this process, httpx.AsyncClient) keeps
`concurrency` requests in flight until a fixed number has been sent, one image per request
(--image-format png or jpeg, --image-size; multipart `files`, as a client sends it; the body is
built once per image so the client spends its CPU on HTTP only). Every response must be 200 and
its top-5 labels and scores must match a bitcore Predictor run directly on the very bytes sent;
otherwise the script fails: a benchmark that measured error responses would look fast.

Columns: images/s (requests completed / wall time of the round, summed over rounds), latency
percentiles over all timed requests, the mean forward batch size (delta of the server's
bitserve_predict_batch_size histogram sum/count over the timed requests, from /metrics; a peer
logs its batch sizes to a file), server CPU milliseconds per image (utime+stime of the server's
process tree from /proc, which a core held by another process does not inflate; LitServe's
includes its queue manager and inference worker processes), the same for this load-generating
process (it shares the cores), images/s relative to `off` at the same concurrency and, with
--peer litserve, relative to litserve. After the table, the goals of issue 13 with PASS/FAIL
(benchmarks/serve_report.py); --json PATH also writes the rows and goals as JSON.

Torch threads: each server process runs torch.set_num_threads(--threads), 1 by default. The two
cores of the development machine are shared by the server's event loop and decode threads, the
load generator and other processes; one intra-op thread leaves a core for the rest and avoids
OpenMP barrier stalls under contention (see RESULTS.md, "Prediction speed"). On a dedicated
serving machine set it to the cores the server has to itself. The peers use the same count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from loopback import Server, cpu_model  # benchmarks/ is on sys.path when run as a script
from loopback import start_server as loopback_server
from serve_load import (
    PEERS,
    PREDICT_PATH,
    TOP_K,
    Point,
    check_responses,
    drive,
    make_images,
    multipart_body,
    read_batch_log,
)
from serve_report import header_line, print_report, write_json

from bitcore.models import create_model
from bitcore.predict import Predictor

NUM_CLASSES = 10
NUM_IMAGES = 16  # distinct request images, used round-robin
IMAGE_SIZE = (160, 192)  # (height, width) without --image-size: resized to the crop by the server
STARTUP_TIMEOUT_S = 120.0
BATCH_ON = 32  # the default predict_max_batch_size
BENCH_RATE = 1e9  # predict_rate_per_second of every server: never the bottleneck


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

    # The predict rate limit (50/s per key by default) would refuse a fast model's load: the
    # limiter still runs on every request, its bucket just never empties.
    settings = Settings(
        home=Path(home), auto_migrate=False, predict_rate_per_second=BENCH_RATE, **overrides
    )
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


@dataclass
class Target:
    """One server under test: where to send the request and how to read its batch sizes."""

    server: Server
    path: str
    batches: Callable[[], tuple[float, float]]  # (sum, count) of forward batch sizes so far

    @property
    def name(self) -> str:
        return self.server.name


def start_bitserve(
    name: str, home: Path, overrides: dict[str, Any], threads: int, path: str
) -> Target:
    server = start_server(name, home, overrides, threads)
    return Target(server, path, lambda: batch_histogram(server.url))


def start_peer(kind: str, artifact: Path, threads: int, log: Path) -> Target:
    """A peer server (benchmarks/serve_peers.py) of `kind` on its own loopback socket."""
    script = str(Path(__file__).with_name("serve_peers.py"))
    args = ["--kind", kind, "--artifact", str(artifact), "--threads", str(threads)]
    server = loopback_server(script, kind, [*args, "--batch-log", str(log)], STARTUP_TIMEOUT_S)
    return Target(server, PREDICT_PATH, lambda: read_batch_log(log))


# -- the model ---------------------------------------------------------------------------------


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


# -- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # this process only checks answers and generates load
    images = make_images(NUM_IMAGES, args.image_size, args.image_format)
    bodies = [multipart_body(i, data, args.image_format) for i, data in enumerate(images)]
    with tempfile.TemporaryDirectory(prefix="bitserve-serve-bench-") as tmp:
        home = Path(tmp)
        model_id, artifact, key = setup_home(home, args.model, args.crop)
        predictor = Predictor.load(artifact, "cpu")
        expected = predictor.predict(images, top_k=TOP_K)  # the very bytes that are sent
        path = f"/v1/models/{model_id}/predict?top_k={TOP_K}"
        targets: list[Target] = []
        try:
            for name, overrides in configs(args.delays, args.auth_cost).items():
                targets.append(start_bitserve(name, home, overrides, args.threads, path))
            for kind in args.peer:
                log = home / f"{kind}-batches.log"
                targets.append(start_peer(kind, artifact, args.threads, log))
            load_before = os.getloadavg()[0]
            # Warm-up: model load + warm-up forward, then the batch shapes each level produces
            # (oneDNN builds kernels per input shape on first use).
            for target in targets:
                for level in args.concurrency:
                    _, _, responses = asyncio.run(
                        drive(
                            target.server.url, target.path, bodies, args.warmup + level, level, key
                        )
                    )
                    check_responses(target.name, responses, expected)
            points = {(t.name, c): Point(t.name, c) for t in targets for c in args.concurrency}
            per_round = math.ceil(args.requests / args.rounds)
            for level in args.concurrency:
                for round_index in range(args.rounds):
                    order = targets if round_index % 2 == 0 else targets[::-1]
                    for target in order:
                        measure(
                            target, points[(target.name, level)], bodies, per_round, key, expected
                        )
            load_after = os.getloadavg()[0]
        finally:
            for target in targets:
                target.server.stop()
    names = [t.name for t in targets]
    header = header_line(
        args, NUM_CLASSES, cpu_model(), torch.__version__, (load_before, load_after)
    )
    checked = print_report(args, names, points, header)
    if args.json:
        write_json(Path(args.json), args, names, points, header, checked)


def measure(
    target: Target,
    point: Point,
    bodies: list[bytes],
    count: int,
    key: str,
    expected: list[list[tuple[str, float]]],
) -> None:
    """One timed round against one server, added to its point."""
    server = target.server
    sum0, count0 = target.batches()
    cpu0, client0 = server.cpu_seconds(), time.process_time()
    seconds, latencies, responses = asyncio.run(
        drive(server.url, target.path, bodies, count, point.concurrency, key, start=point.requests)
    )
    cpu1, client1 = server.cpu_seconds(), time.process_time()
    sum1, count1 = target.batches()
    check_responses(target.name, responses, expected)
    point.requests += len(responses)
    point.seconds += seconds
    point.latencies += latencies
    point.batch_sum += sum1 - sum0
    point.batch_count += count1 - count0
    point.cpu_seconds += cpu1 - cpu0
    point.client_cpu_seconds += client1 - client0


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
    parser.add_argument(
        "--peer",
        action="extend",
        nargs="+",
        choices=PEERS,
        default=[],
        help="also serve the model with this stack (benchmarks/serve_peers.py); repeatable",
    )
    parser.add_argument(
        "--image-format", choices=["png", "jpeg"], default="png", help="request image encoding"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help=f"square request images of this many px (default {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]})",
    )
    parser.add_argument("--json", help="also write the rows and goals to this JSON file")
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
        or (args.image_size is not None and args.image_size < 1)
    ):
        parser.error(
            "--requests, --rounds, --concurrency, --threads, --image-size must be >= 1, "
            "--delays >= 0"
        )
    args.peer = list(dict.fromkeys(args.peer))  # each peer once, in the order given
    size = args.image_size
    args.image_size = IMAGE_SIZE if size is None else (size, size)
    run(args)


if __name__ == "__main__":
    main()
