"""The request side of benchmarks/serve_speed.py: the images, the closed-loop load generator
and the answer check, shared by the bitserve servers and the peers (benchmarks/serve_peers.py).

Every server receives the same request: a multipart body with one image in the field `files`,
built once per image so that the client spends its CPU on HTTP only. Only the path differs
(bitserve: /v1/models/{id}/predict?top_k=5, a peer: /predict). The answer must be the JSON
shape of bitserve's predict, {"predictions": [{"top_k": [{"label", "score"}, ...]}]}.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

TOP_K = 5
SCORE_TOL = 1e-4  # batched vs single forward, eager vs onnxruntime: same maths, other kernels
BOUNDARY = "bitserve-bench-boundary"
POINT_TIMEOUT_S = 600.0
FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg")}
JPEG_QUALITY = 90
PEERS = ("litserve", "fastapi")  # benchmarks/serve_peers.py: imported only by the peer process
PREDICT_PATH = "/predict"  # the peers' path


def make_images(count: int, size: tuple[int, int], image_format: str) -> list[bytes]:
    """Smooth colour fields with stripes and noise, (height, width) `size`, encoded as
    `image_format` (png or jpeg): real, decodable, all different."""
    height, width = size
    pil_format = FORMATS[image_format][0]
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
        options = {"quality": JPEG_QUALITY} if pil_format == "JPEG" else {}
        image.save(buffer, format=pil_format, **options)
        images.append(buffer.getvalue())
    return images


def multipart_body(index: int, data: bytes, image_format: str) -> bytes:
    content_type = FORMATS[image_format][1]
    head = (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="files"; filename="img{index}.{image_format}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


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

    def cpu_ms_per_image(self, client: bool = False) -> float:
        seconds = self.client_cpu_seconds if client else self.cpu_seconds
        return 1000.0 * seconds / self.requests if self.requests else math.nan


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
        "authorization": f"Bearer {key}",  # the peers ignore it
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


def read_batch_log(path: Path) -> tuple[float, float]:
    """(sum, count) of the batch sizes logged so far, like bitserve's histogram."""
    if not path.exists():
        return 0.0, 0.0
    sizes = [int(line) for line in path.read_text(encoding="ascii").split()]
    return float(sum(sizes)), float(len(sizes))
