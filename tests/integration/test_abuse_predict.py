"""Issue 11, predict: admission before the body is read (503 `overloaded` + Retry-After at
once, bounded memory) and a lower pixel cap for predict images than for dataset images."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from bitcore.models import create_model
from service.settings import Settings
from tests.integration.conftest import LiveServer, make_settings
from tests.model_fixtures import publish_model

pytestmark = pytest.mark.integration

MIB = 1 << 20


def _publish(server: LiveServer) -> str:
    torch.manual_seed(0)
    model = create_model("tiny-R10x0.25", 3)
    state = server.app.state
    return publish_model(state.db, state.storage, model, "tiny-R10x0.25", ["a", "b", "c"], 32)[0]


def _png(width: int, height: int, *, noise: bool = False) -> bytes:
    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", (width, height), (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert body["code"] == code, body
    return body


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


@pytest.fixture
def predict_server(
    start_server: Callable[..., LiveServer], settings: Settings, tmp_path: Path
) -> Callable[..., LiveServer]:
    def start(**overrides: Any) -> LiveServer:
        tight = make_settings(tmp_path, settings.database_url, settings.broker_url, **overrides)
        return start_server(tight)

    return start


def test_predict_admission_answers_503_before_the_body_is_read(
    predict_server: Callable[..., LiveServer],
) -> None:
    server = predict_server(predict_max_concurrent_requests=1)
    model_id = _publish(server)
    admission = server.app.state.predict_admission
    url = f"/v1/models/{model_id}/predict"
    # One request holds the only admission: headers and a body that stops after 10 bytes.
    stalled = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    stalled.sendall(
        (
            f"POST {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {10 * MIB}\r\n\r\n"
            '{"instance'
        ).encode()
    )
    try:
        _wait_for(lambda: admission.requests == 1)
        # The original: a 63 MB base64 body. Declared, never sent: answered from the headers.
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as other:
            started = time.monotonic()
            other.sendall(
                (
                    f"POST {url} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: Bearer {server.key}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {63 * 1000 * 1000}\r\n\r\n"
                ).encode()
            )
            answer = other.recv(65536)
            assert time.monotonic() - started < 5
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 503"), answer
        assert b"retry-after: 1" in head
        assert b'"overloaded"' in answer
    finally:
        stalled.close()
    _wait_for(lambda: admission.requests == 0)
    with httpx.Client(base_url=server.url, timeout=60, headers=server.headers) as http:
        response = http.post(url, files=[("files", ("a.png", _png(40, 40)))])
        assert response.status_code == 200, response.text
        assert http.get("/healthz").status_code == 200


def test_concurrent_big_predicts_are_bounded_in_memory(
    predict_server: Callable[..., LiveServer],
) -> None:
    # The original: eight concurrent 63 MB base64 predicts added 0.9 GB. Scaled: eight 6 MB
    # bodies, two admitted at once; the model is held busy so the admitted ones stay in flight.
    server = predict_server(predict_max_concurrent_requests=2, predict_max_request_bytes=8 * MIB)
    model_id = _publish(server)
    url = f"{server.url}/v1/models/{model_id}/predict"
    cache = server.app.state.models
    image = _png(1200, 1200, noise=True)  # ~4.3 MB of PNG, ~5.8 MB of base64
    body = ('{"instances": [{"image_b64": "' + base64.b64encode(image).decode() + '"}]}').encode()
    assert 4 * MIB < len(body) < 8 * MIB
    headers = {**server.headers, "content-type": "application/json"}
    with httpx.Client(timeout=120, headers=server.headers) as http:
        small = [("files", ("a.png", _png(40, 40)))]
        assert http.post(url, files=small).status_code == 200  # loaded and warm
    predictor = cache.peek(model_id)
    assert predictor is not None
    results: list[int] = []
    before = _rss()
    predictor._lock.acquire()  # the next forward waits: admitted requests stay in flight
    try:

        def send() -> None:
            with httpx.Client(timeout=120) as one:
                results.append(one.post(url, content=body, headers=headers).status_code)

        threads = [threading.Thread(target=send) for _ in range(8)]
        for thread in threads:
            thread.start()
        _wait_for(lambda: results.count(503) == 6)
        peak = _rss() - before
    finally:
        predictor._lock.release()
    for thread in threads:
        thread.join(120)
    assert sorted(results) == [200, 200, 503, 503, 503, 503, 503, 503]
    # Two bodies in flight (each read, parsed and decoded: a few copies of 6 MB) and the
    # client's eight threads: far from eight bodies' worth (0.9 GB at 63 MB each).
    assert peak < 120 * MIB, peak


def test_predict_pixel_cap_is_lower_than_for_datasets(
    live_server_instance: LiveServer,
) -> None:
    # The original: sixteen 62-megapixel PNGs in a 3.2 MB request took 31 s. Over the 16 MP
    # predict cap (datasets take 64 MP), they are refused from their headers, undecoded.
    server = live_server_instance
    assert server.settings.predict_max_image_pixels == 16_000_000
    assert server.settings.max_image_pixels == 64_000_000
    model_id = _publish(server)
    big = _png(4100, 4100)  # 16.8 MP of one colour: ~50 KB
    files = [("files", (f"big{i}.png", big)) for i in range(16)]
    with httpx.Client(base_url=server.url, timeout=60, headers=server.headers) as http:
        started = time.monotonic()
        response = http.post(f"/v1/models/{model_id}/predict", files=files)
        elapsed = time.monotonic() - started
        body = _error(response, 422, "invalid_image")
        assert body["details"]["reason"] == "too_many_pixels"
        assert body["details"]["index"] == 0
        assert elapsed < 5, elapsed
        assert http.get("/healthz").status_code == 200
