"""bitserve_client against a tiny scripted http.server on loopback: waiting for a dataset's
ingestion and for a job over their event streams (progress callbacks, `reconnect`, a stream cut
short, a stream that only pings while the deadline passes) and the polling it falls back to
when streams are refused, break off or the server is not answering. Retries and errors are in
test_client_retries.py.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bitserve_client import (
    ApiError,
    BitserveClient,
    DatasetFailed,
    DatasetTimeout,
    JobEvent,
    JobFailed,
    JobTimeout,
    ServerUnreachable,
    zip_folder,
)
from tests.imagegen import make_image_folder
from tests.unit.client_protocol_helpers import (
    NOT_ANSWERING,
    PROCESSING,
    QUEUED,
    Reply,
    Scripted,
    _closed_url,
    _error,
    _no_ambient_key,  # noqa: F401 (autouse fixture)
)

# -- event streams and polling against a scripted loopback server -------------------------------


def _dataset(status: str, progress: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    return {"id": "ds_x", "name": "x", "status": status, "progress": progress, **extra}


def _job(status: str, step: int, **extra: Any) -> dict[str, Any]:
    return {"id": "job_x", "status": status, "progress": {"step": step, "total_steps": 3}, **extra}


def _sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    # \r\n line ends and a keep-alive comment, as sse-starlette writes them.
    out = ": ping\r\n\r\n"
    for name, data in events:
        out += f"event: {name}\r\ndata: {json.dumps(data)}\r\n\r\n"
    return out.encode()


STREAM = {"Content-Type": "text/event-stream"}


def test_an_upload_waits_for_ingestion_over_the_event_stream(tmp_path: Path) -> None:
    archive = zip_folder(make_image_folder(tmp_path / "f", {"a": 2, "b": 2}), tmp_path / "f.zip")
    extracting = {"phase": "extracting", "done": 1, "total": 4}
    indexing = {"phase": "indexing", "done": 4, "total": 4}
    ready = _dataset("ready", None, num_images=4)
    body = _sse(
        ("status", _dataset("processing", QUEUED)),
        ("progress", {"id": "ds_x", **extracting}),
        ("progress", {"id": "ds_x", **indexing}),
        ("status", ready),
        ("done", ready),
    )
    script = {
        ("POST", "/v1/datasets"): [Reply(202, json.dumps(PROCESSING).encode())],
        ("GET", "/v1/datasets/ds_x/events"): [Reply(200, body, STREAM)],
    }
    seen: list[Any] = []
    with Scripted(script) as server, BitserveClient(server.url) as api:
        assert api.upload_dataset(archive, on_progress=seen.append) == ready
        # wait=False: the processing dataset as the server answered it, nothing else asked.
        assert api.upload_dataset(archive, wait=False) == PROCESSING
    assert seen == [{"id": "ds_x", **extracting}, {"id": "ds_x", **indexing}]
    assert [(s.method, s.path) for s in server.seen] == [
        ("POST", "/v1/datasets"),
        ("GET", "/v1/datasets/ds_x/events"),
        ("POST", "/v1/datasets"),
    ]
    assert server.seen[1].headers["accept"] == "text/event-stream"


def test_a_failed_ingestion_raises_the_datasets_error_as_an_api_error() -> None:
    classes = [{"name": "solo", "count": 3}]
    error = {"code": "too_few_classes", "message": "1 class", "details": {"classes": classes}}
    failed = _dataset("failed", None, error=error, num_images=0)
    script = {("GET", "/v1/datasets/ds_x/events"): [Reply(200, _sse(("done", failed)), STREAM)]}
    with (
        Scripted(script) as server,
        BitserveClient(server.url) as api,
        pytest.raises(ApiError) as caught,  # what a caller of the old 422 caught
    ):
        api.wait_for_dataset("ds_x")
    assert isinstance(caught.value, DatasetFailed)
    assert (caught.value.status, caught.value.code, caught.value.message) == (
        422,
        "too_few_classes",
        "1 class",
    )
    assert caught.value.details == {"classes": classes}
    assert (caught.value.dataset_id, caught.value.dataset) == ("ds_x", failed)
    # The status the synchronous upload answered: 413 for an archive too large, 507 disk full.
    too_large = _dataset("failed", None, error={"code": "archive_too_large", "message": "m"})
    assert DatasetFailed(too_large).status == 413
    full = _dataset("failed", None, error={"code": "insufficient_storage", "message": "m"})
    assert DatasetFailed(full).status == 507


def test_wait_for_dataset_polls_when_streams_are_refused_and_times_out() -> None:
    # 429 too_many_streams: this key's streams are all taken; poll GET /v1/datasets/{id}.
    refused = Reply(429, _error("too_many_streams"), {"Retry-After": "5"})
    extracting = {"phase": "extracting", "done": 2, "total": 9}
    polls = [
        Reply(200, json.dumps(_dataset("processing", QUEUED)).encode()),
        Reply(200, json.dumps(_dataset("processing", extracting)).encode()),
        Reply(200, json.dumps(_dataset("ready", None, num_images=9)).encode()),
    ]
    script = {
        ("GET", "/v1/datasets/ds_x/events"): [refused],
        ("GET", "/v1/datasets/ds_x"): polls,
    }
    with Scripted(script) as server, BitserveClient(server.url, max_retries=0) as api:
        events = [
            (e.event, e.data.get("status"), e.data.get("phase"))
            for e in api.watch_dataset("ds_x", poll_interval=0.01)
        ]
    assert events == [
        ("progress", None, "queued"),
        ("status", "processing", None),
        ("progress", None, "extracting"),
        ("status", "ready", None),  # the ready dataset's null progress makes no event
        ("done", "ready", None),
    ]
    script = {
        ("GET", "/v1/datasets/ds_x/events"): [refused],
        ("GET", "/v1/datasets/ds_x"): [
            Reply(200, json.dumps(_dataset("processing", extracting)).encode())
        ],
    }
    with Scripted(script) as server, BitserveClient(server.url, max_retries=0) as api:
        started = time.monotonic()
        with pytest.raises(DatasetTimeout) as caught:
            api.wait_for_dataset("ds_x", timeout=0.3, poll_interval=0.05)
        elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 1.5
    assert (caught.value.dataset_id, caught.value.timeout) == ("ds_x", 0.3)
    assert caught.value.last is not None and caught.value.last["progress"] == extracting
    assert str(caught.value) == "dataset ds_x still processing after 0.3 s (last phase extracting)"


def test_watch_job_reads_the_event_stream() -> None:
    body = _sse(
        ("status", _job("running", 0)),
        ("progress", {"id": "job_x", "step": 2, "total_steps": 3, "loss": 0.5}),
        ("done", _job("succeeded", 3, model_id="mdl_x")),
    )
    script = {("GET", "/v1/jobs/job_x/events"): [Reply(200, body, STREAM)]}
    seen: list[Any] = []
    with Scripted(script) as server, BitserveClient(server.url) as api:
        events = list(api.watch_job("job_x"))
        job = api.wait_for_job("job_x", on_progress=seen.append)
    assert [e.event for e in events] == ["status", "progress", "done"]
    assert events[1] == JobEvent(
        "progress", {"id": "job_x", "step": 2, "total_steps": 3, "loss": 0.5}
    )
    assert job["model_id"] == "mdl_x"
    assert seen == [{"id": "job_x", "step": 2, "total_steps": 3, "loss": 0.5}]


def test_watch_job_opens_a_new_stream_on_reconnect() -> None:
    # The server ends a stream past its lifetime with `reconnect`: the client opens a new
    # stream (not polling), and the new stream's first `status`, unchanged, is not repeated.
    first = _sse(("status", _job("running", 1)), ("reconnect", {"id": "job_x"}))
    second = _sse(("status", _job("running", 1)), ("done", _job("succeeded", 3)))
    script = {
        ("GET", "/v1/jobs/job_x/events"): [Reply(200, first, STREAM), Reply(200, second, STREAM)],
    }
    with Scripted(script) as server, BitserveClient(server.url) as api:
        events = [(e.event, e.data.get("status")) for e in api.watch_job("job_x")]
        paths = [seen.path for seen in server.seen]
    assert events == [("status", "running"), ("done", "succeeded")]
    assert paths == ["/v1/jobs/job_x/events", "/v1/jobs/job_x/events"]


def test_watch_job_polls_when_the_stream_breaks_off() -> None:
    cut = _sse(("status", _job("running", 1)))  # the stream ends without `done`
    polls = [
        Reply(200, json.dumps(_job("running", 1)).encode()),  # unchanged: no event
        Reply(200, json.dumps(_job("running", 2)).encode()),
        Reply(
            200,
            json.dumps(
                _job("failed", 2, error={"code": "worker_lost", "message": "the worker died"})
            ).encode(),
        ),
    ]
    script = {
        ("GET", "/v1/jobs/job_x/events"): [Reply(200, cut, STREAM)],
        ("GET", "/v1/jobs/job_x"): polls,
    }
    with Scripted(script) as server, BitserveClient(server.url) as api:
        events = [
            (e.event, e.data.get("status"), e.data.get("step"))
            for e in api.watch_job("job_x", poll_interval=0.01)
        ]
    assert events == [
        ("status", "running", None),
        ("progress", None, 2),
        ("status", "failed", None),
        ("done", "failed", None),
    ]
    failed = _job("failed", 2, error={"code": "worker_lost", "message": "the worker died"})
    script = {
        ("GET", "/v1/jobs/job_x/events"): [Reply(404, b"not here", {})],
        ("GET", "/v1/jobs/job_x"): [Reply(200, json.dumps(failed).encode())],
    }
    with (
        Scripted(script) as server,
        BitserveClient(server.url) as api,
        pytest.raises(JobFailed) as caught,
    ):
        api.wait_for_job("job_x", poll_interval=0.01)
    assert (caught.value.code, caught.value.message) == ("worker_lost", "the worker died")


class PingsOnly(BaseHTTPRequestHandler):
    """An event stream that only ever sends keep-alive comments (a job waiting in the queue),
    one every 0.1 s for at most 5 s."""

    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for _ in range(50):
            try:
                self.wfile.write(b": ping\r\n\r\n")
                self.wfile.flush()
            except OSError:  # the client gave up: the point of the test
                return
            time.sleep(0.1)

    def log_message(self, *_: Any) -> None:
        pass


def test_the_deadline_holds_while_the_stream_only_pings() -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), PingsOnly)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with BitserveClient(url) as api, pytest.raises(JobTimeout) as caught:
            start = time.monotonic()
            api.wait_for_job("job_x", timeout=0.5)
        elapsed = time.monotonic() - start
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert caught.value.job_id == "job_x"
    assert 0.5 <= elapsed < 1.5  # noticed on a ping, not at the end of the 5 s stream


def test_the_job_watch_falls_back_to_polling_then_says_the_server_is_not_answering() -> None:
    url = _closed_url()
    with BitserveClient(url, max_retries=1) as api, pytest.raises(ServerUnreachable) as caught:
        api.wait_for_job("job_x", timeout=30)
    assert str(caught.value) == NOT_ANSWERING.format(url)
