"""bitserve_client against a tiny scripted http.server on loopback: what a healthy bitserve
never does (503 then 200, Retry-After as an HTTP date, an HTML error page, a cut event stream).
"""

from __future__ import annotations

import json
import threading
import time
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
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
from bitserve_client.errors import retry_after_seconds
from tests.imagegen import make_image_folder

# -- retries, headers and streams against a scripted loopback server ---------------------------


@pytest.fixture(autouse=True)
def _no_ambient_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The client reads BITSERVE_API_KEY or $BITSERVE_HOME/admin.key when given no key: keep
    # whatever this machine has out of these tests.
    monkeypatch.delenv("BITSERVE_API_KEY", raising=False)
    monkeypatch.setenv("BITSERVE_HOME", str(tmp_path / "no-home"))


@dataclass
class Reply:
    status: int
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Scripted:
    """A loopback HTTP server answering each (method, path) from a script; the last reply of a
    script repeats. Records every request."""

    def __init__(self, script: dict[tuple[str, str], list[Reply]]) -> None:
        self.script = script
        self.seen: list[Seen] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                body = self._body()
                outer.seen.append(
                    Seen(
                        self.command,
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                    )
                )
                replies = outer.script.get((self.command, self.path.split("?")[0]))
                if not replies:
                    reply = Reply(404, _error("not_found", "no"))
                else:
                    reply = replies.pop(0) if len(replies) > 1 else replies[0]
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(reply.body)
                self.close_connection = True

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            return data
                        data += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Scripted:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _error(code: str, message: str = "busy", details: dict[str, Any] | None = None) -> bytes:
    return json.dumps(
        {"error": {"code": code, "message": message, "details": details or {}}}
    ).encode()


DATASET = {"id": "ds_x", "name": "x", "status": "ready"}
QUEUED = {"phase": "queued", "done": None, "total": None}
PROCESSING = {"id": "ds_x", "name": "x", "status": "processing", "progress": QUEUED}


def test_503_is_retried_after_retry_after_then_succeeds() -> None:
    busy = Reply(
        503, _error("overloaded"), {"Content-Type": "application/json", "Retry-After": "1"}
    )
    ok = Reply(200, json.dumps(DATASET).encode())
    script = {("GET", "/v1/datasets/ds_x"): [busy, ok]}
    with Scripted(script) as server, BitserveClient(server.url, api_key="secret-key") as api:
        started = time.monotonic()
        assert api.get_dataset("ds_x") == DATASET
        elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 3.0  # waited the server's 1 s, once
    assert [s.path for s in server.seen] == ["/v1/datasets/ds_x"] * 2
    assert all(s.headers["authorization"] == "Bearer secret-key" for s in server.seen)


def test_retries_are_bounded_and_the_last_error_is_raised() -> None:
    busy = Reply(
        503,
        _error("overloaded", "the server is busy", {"waiting": 256, "limit": 256}),
        {"Content-Type": "application/json", "Retry-After": "0"},
    )
    with Scripted({("GET", "/v1/models/mdl_x"): [busy]}) as server:
        with BitserveClient(server.url, max_retries=2) as api, pytest.raises(ApiError) as caught:
            api.get_model("mdl_x")
        with BitserveClient(server.url, max_retries=0) as api, pytest.raises(ApiError):
            api.get_model("mdl_x")
    error = caught.value
    assert (error.status, error.code, error.message) == (503, "overloaded", "the server is busy")
    assert (error.details, error.retry_after) == ({"waiting": 256, "limit": 256}, 0.0)
    assert len(server.seen) == 3 + 1  # 1 + 2 retries, then 1 with retries off
    assert "authorization" not in server.seen[0].headers


def test_a_retried_upload_sends_the_whole_archive_again(tmp_path: Path) -> None:
    archive = zip_folder(make_image_folder(tmp_path / "f", {"a": 2, "b": 2}), tmp_path / "f.zip")
    limited = Reply(429, _error("too_many_requests"), {"Retry-After": "0"})
    accepted = Reply(202, json.dumps(PROCESSING).encode())
    script = {("POST", "/v1/datasets"): [limited, accepted]}
    with Scripted(script) as server, BitserveClient(server.url) as api:
        assert api.upload_dataset(archive, name="f", wait=False) == PROCESSING
    first, second = server.seen
    data = archive.read_bytes()
    assert len(first.body) == len(second.body)
    assert data in first.body and data in second.body  # the file part, whole, both times
    assert b'name="name"\r\n\r\nf\r\n' in second.body
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == [f"{c}/{c}_{i:03d}.png" for c in "ab" for i in range(2)]


def test_an_upload_is_retried_only_when_the_server_did_nothing(tmp_path: Path) -> None:
    # 503 too_many_uploads is answered before the body is read: safe to send again. Any
    # other 503 may come after the archive was stored: a second POST could make a second
    # dataset, so it is raised.
    archive = zip_folder(make_image_folder(tmp_path / "f", {"a": 2, "b": 2}), tmp_path / "f.zip")
    busy = Reply(503, _error("too_many_uploads"), {"Retry-After": "0"})
    down = Reply(503, _error("storage_unavailable"), {"Retry-After": "0"})
    accepted = Reply(202, json.dumps(PROCESSING).encode())
    script = {("POST", "/v1/datasets"): [busy, accepted]}
    with Scripted(script) as server, BitserveClient(server.url) as api:
        assert api.upload_dataset(archive, wait=False) == PROCESSING
        assert [s.method for s in server.seen] == ["POST", "POST"]
    script = {("POST", "/v1/datasets"): [down, accepted]}
    with Scripted(script) as server, BitserveClient(server.url) as api:
        with pytest.raises(ApiError) as caught:
            api.upload_dataset(archive, wait=False)
        assert (caught.value.status, caught.value.code) == (503, "storage_unavailable")
        assert len(server.seen) == 1


def _dataset(status: str, progress: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    return {"id": "ds_x", "name": "x", "status": status, "progress": progress, **extra}


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


def test_an_error_that_is_not_json_still_becomes_api_error() -> None:
    page = Reply(502, b"<html>Bad Gateway</html>", {"Content-Type": "text/html"})
    script = {("DELETE", "/v1/models/mdl_x"): [page]}
    with (
        Scripted(script) as server,
        BitserveClient(server.url) as api,
        pytest.raises(ApiError) as caught,
    ):
        api.delete_model("mdl_x")
    assert (caught.value.status, caught.value.code) == (502, "http_502")
    assert caught.value.message == "<html>Bad Gateway</html>"


def test_retry_after_as_an_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    response = httpx.Response(503, headers={"Retry-After": format_datetime(when, usegmt=True)})
    seconds = retry_after_seconds(response)
    assert seconds is not None and 28.0 <= seconds <= 30.0
    assert retry_after_seconds(httpx.Response(503, headers={"Retry-After": "7"})) == 7.0
    assert retry_after_seconds(httpx.Response(503)) is None


def _job(status: str, step: int, **extra: Any) -> dict[str, Any]:
    return {"id": "job_x", "status": status, "progress": {"step": step, "total_steps": 3}, **extra}


def _sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    # \r\n line ends and a keep-alive comment, as sse-starlette writes them.
    out = ": ping\r\n\r\n"
    for name, data in events:
        out += f"event: {name}\r\ndata: {json.dumps(data)}\r\n\r\n"
    return out.encode()


STREAM = {"Content-Type": "text/event-stream"}


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


def test_the_key_comes_from_the_environment_or_bitserve_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = {("GET", "/v1/datasets/ds_x"): [Reply(200, json.dumps(DATASET).encode())]}
    monkeypatch.setenv("BITSERVE_HOME", str(tmp_path))
    monkeypatch.delenv("BITSERVE_API_KEY", raising=False)
    (tmp_path / "admin.key").write_text("bsk_from_file\n")
    with Scripted(script) as server:
        with BitserveClient(server.url) as api:
            api.get_dataset("ds_x")
        monkeypatch.setenv("BITSERVE_API_KEY", "bsk_from_env")
        with BitserveClient(server.url) as api:
            api.get_dataset("ds_x")
        with BitserveClient(server.url, api_key="") as api:  # explicitly none
            api.get_dataset("ds_x")
    sent = [s.headers.get("authorization") for s in server.seen]
    assert sent == ["Bearer bsk_from_file", "Bearer bsk_from_env", None]


# -- retries of lost connections and of 503s, by idempotency -----------------------------------


class DropsFirst:
    """A loopback server that closes its first `drops` connections without answering (a
    gateway going away), then answers every request 200 `{}`. Counts connections."""

    def __init__(self, drops: int) -> None:
        import socket

        self.drops = drops
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.recv(65536)  # the request (small in these tests)
                if self.connections > self.drops:
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
                    )

    def __enter__(self) -> DropsFirst:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()


def test_a_lost_connection_is_retried_for_idempotent_calls_only() -> None:
    with DropsFirst(drops=2) as server, BitserveClient(server.url) as api:
        assert api.get_model("mdl_x") == {}
        assert server.connections == 3  # two lost, the third answered
    with DropsFirst(drops=1) as server, BitserveClient(server.url) as api:
        with pytest.raises(httpx.RemoteProtocolError):
            api.cancel_job("job_x")  # a POST that changes state: the server may have acted
        assert server.connections == 1


def _closed_url() -> str:
    import socket

    with socket.socket() as sock:  # a port with nothing listening once it is closed
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


NOT_ANSWERING = (
    "the bitserve server at {} is not answering; start it with `bitserve up` (or "
    "`docker compose up`), or point BITSERVE_URL / --url at a running one"
)


def test_a_refused_connection_is_retried_with_backoff_then_raised() -> None:
    url = _closed_url()
    with (
        BitserveClient(url + "/", max_retries=2) as api,
        pytest.raises(ServerUnreachable) as caught,
    ):
        started = time.monotonic()
        api.cancel_job("job_x")  # nothing was sent: safe to retry even a POST
    assert time.monotonic() - started >= 0.25 + 0.5  # backed off twice
    assert str(caught.value) == NOT_ANSWERING.format(url)
    assert caught.value.url == url
    assert "refused" in caught.value.reason.lower()
    # Still the httpx error the client raised before, caused by the last try's.
    assert isinstance(caught.value, httpx.ConnectError)
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert not isinstance(caught.value.__cause__, ServerUnreachable)
    assert caught.value.request.url == f"{url}/v1/jobs/job_x/cancel"


def test_a_refused_stream_is_not_retried_and_says_the_server_is_not_answering(
    tmp_path: Path,
) -> None:
    url = _closed_url()
    with BitserveClient(url, max_retries=3) as api, pytest.raises(ServerUnreachable) as caught:
        started = time.monotonic()
        api.download_artifact("mdl_x", tmp_path)
    assert time.monotonic() - started < 0.25  # the download is not retried (no back-off)
    assert str(caught.value) == NOT_ANSWERING.format(url)
    assert list(tmp_path.iterdir()) == []


def test_the_job_watch_falls_back_to_polling_then_says_the_server_is_not_answering() -> None:
    url = _closed_url()
    with BitserveClient(url, max_retries=1) as api, pytest.raises(ServerUnreachable) as caught:
        api.wait_for_job("job_x", timeout=30)
    assert str(caught.value) == NOT_ANSWERING.format(url)


def test_503_is_retried_for_a_post_only_when_it_says_nothing_was_done() -> None:
    job = {"id": "job_x", "status": "cancelled"}
    down = Reply(503, _error("database_unavailable"), {"Retry-After": "0"})
    stopping = Reply(503, _error("shutting_down"), {"Retry-After": "0", "Connection": "close"})
    ok = Reply(200, json.dumps(job).encode())
    script = {("POST", "/v1/jobs/job_x/cancel"): [down, ok]}
    with Scripted(script) as server, BitserveClient(server.url) as api:
        with pytest.raises(ApiError) as caught:
            api.cancel_job("job_x")
        assert caught.value.code == "database_unavailable"
        assert len(server.seen) == 1
    script = {("POST", "/v1/jobs/job_x/cancel"): [stopping, ok]}
    with Scripted(script) as server, BitserveClient(server.url) as api:
        assert api.cancel_job("job_x") == job
        assert len(server.seen) == 2
