"""POST /v1/models/{id}/predict over real HTTP (uvicorn) on PostgreSQL: multipart and JSON
base64, checked against bitcore's Predictor on the same images (random weights: every image gets
its own answer, so order matters) and against a model whose head is set so its scores are known
exactly; top-k, unreadable images, bad requests, concurrent requests sharing a forward pass,
and a second server's limits (too many images, too large bodies, overload 503).
"""

from __future__ import annotations

import base64
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from bitcore.predict import Predictor
from service.ids import new_id
from service.settings import Settings
from tests.integration.api_errors import assert_error
from tests.integration.conftest import LiveServer, make_settings
from tests.integration.models_helpers import (
    CLASSES,
    KNOWN,
    _add_model,
    _files,
    _images,
    random_model_fixture,  # noqa: F401 (the fixture random_model)
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def known_model(live_server_instance: LiveServer) -> str:
    return _add_model(live_server_instance, known_head=True)


def test_predict_multipart_one_and_many_match_bitcore(
    client: httpx.Client, live_server_instance: LiveServer, random_model: str
) -> None:
    images = _images(5)
    reference = Predictor.load(
        live_server_instance.app.state.storage.model_dir(random_model), "cpu"
    ).predict(images, top_k=2)
    assert len({tuple(label for label, _ in r) for r in reference}) > 1  # images differ

    one = client.post(
        f"/v1/models/{random_model}/predict", params={"top_k": 2}, files=_files(images[:1])
    )
    assert one.status_code == 200, one.text
    assert one.json()["model_id"] == random_model
    _assert_predictions(one.json()["predictions"], reference[:1])

    many = client.post(
        f"/v1/models/{random_model}/predict", params={"top_k": 2}, files=_files(images)
    )
    assert many.status_code == 200, many.text
    _assert_predictions(many.json()["predictions"], reference)


def test_predict_known_scores_and_top_k_clamp(client: httpx.Client, known_model: str) -> None:
    images = _images(2)
    response = client.post(
        f"/v1/models/{known_model}/predict", params={"top_k": 50}, files=_files(images)
    )
    assert response.status_code == 200, response.text
    expected = list(zip(CLASSES, KNOWN, strict=True))
    _assert_predictions(response.json()["predictions"], [expected, expected], tol=1e-6)

    top1 = client.post(f"/v1/models/{known_model}/predict", files=_files(images[:1]))
    assert top1.status_code == 200
    # default top_k=5 is clamped to the 3 classes
    assert [p["label"] for p in top1.json()["predictions"][0]["top_k"]] == CLASSES
    single = client.post(
        f"/v1/models/{known_model}/predict", params={"top_k": 1}, files=_files(images[:1])
    ).json()
    assert single["predictions"][0]["top_k"] == [{"label": "ant", "score": pytest.approx(0.7)}]
    assert_error(
        client.post(f"/v1/models/{known_model}/predict", params={"top_k": 0}, files=_files(images)),
        422,
        "invalid_request",
    )


def test_predict_json_base64(client: httpx.Client, known_model: str) -> None:
    png, jpeg = _images(1)[0], _images(1, "JPEG")[0]
    instances = [
        {"image_b64": base64.b64encode(png).decode()},
        {"image_b64": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()},
    ]
    response = client.post(
        f"/v1/models/{known_model}/predict", params={"top_k": 2}, json={"instances": instances}
    )
    assert response.status_code == 200, response.text
    expected = list(zip(CLASSES[:2], KNOWN[:2], strict=True))
    _assert_predictions(response.json()["predictions"], [expected, expected], tol=1e-6)

    bad = client.post(
        f"/v1/models/{known_model}/predict",
        json={"instances": [instances[0], {"image_b64": "not base64 at all!"}]},
    )
    assert assert_error(bad, 422, "invalid_base64")["details"] == {"index": 1}
    assert_error(
        client.post(f"/v1/models/{known_model}/predict", json={"images": []}),
        422,
        "invalid_request",
    )
    assert_error(
        client.post(
            f"/v1/models/{known_model}/predict",
            content=b"{not json",
            headers={"content-type": "application/json"},
        ),
        400,
        "malformed_request",
    )


def test_unreadable_image_is_named_magic_bytes_decide(
    client: httpx.Client, known_model: str
) -> None:
    png = _images(1)[0]
    jpeg_named_png = _images(1, "JPEG")[0]
    ok = client.post(
        f"/v1/models/{known_model}/predict",
        files=[("files", ("photo.png", jpeg_named_png, "image/png"))],
    )
    assert ok.status_code == 200, ok.text  # the name and Content-Type do not matter
    response = client.post(
        f"/v1/models/{known_model}/predict",
        files=[
            ("files", ("good.png", png, "image/png")),
            ("files", ("notes.png", b"just some text, not an image", "image/png")),
        ],
    )
    body = assert_error(response, 422, "invalid_image")
    assert body["details"] == {"index": 1, "filename": "notes.png", "reason": "unsupported_format"}
    assert "notes.png" in body["message"]
    truncated = client.post(
        f"/v1/models/{known_model}/predict",
        files=[("files", ("cut.png", png[: len(png) // 2], "image/png"))],
    )
    assert assert_error(truncated, 422, "invalid_image")["details"]["reason"] == "undecodable"


def test_bad_requests_have_the_error_shape(client: httpx.Client, known_model: str) -> None:
    unknown = new_id("mdl")
    for response in (
        client.get(f"/v1/models/{unknown}"),
        client.delete(f"/v1/models/{unknown}"),
        client.get(f"/v1/models/{unknown}/artifact"),
        client.post(f"/v1/models/{unknown}/predict", files=_files(_images(1))),
        client.get("/v1/models/not-an-id"),
    ):
        assert_error(response, 404, "not_found")
    assert_error(
        client.post(
            f"/v1/models/{known_model}/predict",
            content=b"abc",
            headers={"content-type": "text/plain"},
        ),
        415,
        "unsupported_media_type",
    )
    assert_error(
        client.post(f"/v1/models/{known_model}/predict", json={"instances": []}), 422, "no_images"
    )
    assert_error(
        client.post(
            f"/v1/models/{known_model}/predict",
            files=[("image", ("a.png", _images(1)[0]))],
        ),
        422,
        "invalid_request",
    )


def _metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_concurrent_requests_share_a_forward_pass(
    client: httpx.Client, live_server_instance: LiveServer, random_model: str
) -> None:
    url = f"{live_server_instance.url}/v1/models/{random_model}/predict"
    images = _images(4)
    cache = live_server_instance.app.state.models
    assert client.post(url, files=_files(images[:1])).status_code == 200  # loaded
    predictor = cache.peek(random_model)
    assert predictor is not None
    batches = _metric(client, "bitserve_predict_batch_size_count")
    batched_images = _metric(client, "bitserve_predict_batch_size_sum")
    results: dict[int, httpx.Response] = {}

    def send(i: int) -> None:
        with httpx.Client(timeout=60, headers=client.headers) as http:
            results[i] = http.post(url, files=_files(images[i : i + 1]))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    predictor._lock.acquire()  # request 0's forward pass waits; 1-3 queue up behind it
    try:
        threads[0].start()
        _wait_until(lambda: cache.queued(random_model) == (0, 1))  # in the forward pass
        for thread in threads[1:]:
            thread.start()
        _wait_until(lambda: cache.queued(random_model) == (3, 1))
    finally:
        predictor._lock.release()
    for thread in threads:
        thread.join(30)
    reference = Predictor.load(
        live_server_instance.app.state.storage.model_dir(random_model), "cpu"
    ).predict(images, top_k=3)
    for i in range(4):
        assert results[i].status_code == 200, results[i].text
        _assert_predictions(results[i].json()["predictions"], reference[i : i + 1])
    # Two forward passes for four requests: [request 0] and [requests 1, 2, 3].
    assert _metric(client, "bitserve_predict_batch_size_count") - batches == 2
    assert _metric(client, "bitserve_predict_batch_size_sum") - batched_images == 4


def _wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def small_server(
    start_server: Callable[..., LiveServer], settings: Settings, tmp_path: Path
) -> LiveServer:
    """A second server on the same database with tight predict limits."""
    small = make_settings(
        tmp_path,
        settings.database_url,
        settings.broker_url,
        artifact_root=settings.artifact_root,
        predict_max_queue=2,
        predict_max_queue_delay_ms=0,
        predict_max_images_per_request=5,
        predict_max_request_bytes=60_000,
    )
    return start_server(small)


def test_limits_too_many_images_and_too_large_bodies(
    small_server: LiveServer, known_model: str
) -> None:
    url = f"{small_server.url}/v1/models/{known_model}/predict"
    images = _images(3)
    with httpx.Client(timeout=60, headers=small_server.headers) as http:
        # 4 > min(5 per request, queue of 2): could never be admitted, so 413, not 503
        body = assert_error(http.post(url, files=_files(images)), 413, "too_many_images")
        assert body["details"] == {"limit": 2}
        instances = [{"image_b64": base64.b64encode(b).decode()} for b in images]
        assert_error(http.post(url, json={"instances": instances}), 413, "too_many_images")
        big = b"\x89PNG\r\n\x1a\n" + bytes(70_000)
        assert_error(http.post(url, files=[("files", ("big.png", big))]), 413, "payload_too_large")

        def chunked() -> Any:  # no Content-Length: the cap is enforced while streaming
            for _ in range(10):
                yield b"x" * 10_000

        response = http.post(url, content=chunked(), headers={"content-type": "application/json"})
        assert_error(response, 413, "payload_too_large")
        assert http.post(url, files=_files(images[:2])).status_code == 200


def test_overload_answers_503_with_retry_after(small_server: LiveServer, known_model: str) -> None:
    url = f"{small_server.url}/v1/models/{known_model}/predict"
    images = _images(2)
    cache = small_server.app.state.models
    with httpx.Client(timeout=60, headers=small_server.headers) as http:
        assert http.post(url, files=_files(images[:1])).status_code == 200  # load + warm up
        predictor = cache.peek(known_model)
        assert predictor is not None
        results: list[httpx.Response] = []
        predictor._lock.acquire()  # the model is busy: the next forward pass waits
        try:
            first = threading.Thread(
                target=lambda: results.append(http.post(url, files=_files(images)))
            )
            first.start()
            deadline = time.monotonic() + 30
            while cache.waiting < 2:  # both of its images admitted
                assert time.monotonic() < deadline, "first request never queued"
                time.sleep(0.01)
            with httpx.Client(timeout=60, headers=small_server.headers) as other:
                response = other.post(url, files=_files(images[:1]))
            body = assert_error(response, 503, "overloaded")
            assert response.headers["retry-after"] == "1"
            assert body["details"] == {"waiting": 2, "limit": 2}
        finally:
            predictor._lock.release()
        first.join(30)
    assert [r.status_code for r in results] == [200]
    assert len(results[0].json()["predictions"]) == 2


def _assert_predictions(
    got: list[dict[str, Any]], expected: list[list[tuple[str, float]]], tol: float = 1e-5
) -> None:
    assert len(got) == len(expected)
    for item, reference in zip(got, expected, strict=True):
        assert [p["label"] for p in item["top_k"]] == [label for label, _ in reference]
        for p, (_, score) in zip(item["top_k"], reference, strict=True):
            assert math.isclose(p["score"], score, abs_tol=tol), (p, score)
