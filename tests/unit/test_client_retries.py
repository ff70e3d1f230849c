"""bitserve_client against a tiny scripted http.server on loopback: retries and errors a
healthy bitserve never makes (503 then 200, Retry-After as an HTTP date, an HTML error page,
lost and refused connections, which POSTs a 503 lets it send again), and where the key comes
from. Waiting for datasets and jobs is in test_client_waiting.py.
"""

from __future__ import annotations

import json
import threading
import time
import zipfile
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

from bitserve_client import ApiError, BitserveClient, ServerUnreachable, zip_folder
from bitserve_client.errors import retry_after_seconds
from tests.imagegen import make_image_folder
from tests.unit.client_protocol_helpers import (
    NOT_ANSWERING,
    PROCESSING,
    Reply,
    Scripted,
    _closed_url,
    _error,
    _no_ambient_key,  # noqa: F401 (autouse fixture)
)

# -- retries, headers and errors against a scripted loopback server -----------------------------

DATASET = {"id": "ds_x", "name": "x", "status": "ready"}


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
