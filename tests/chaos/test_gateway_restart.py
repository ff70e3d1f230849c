"""`bitserve api` stopped under load: SIGTERM drains, new requests get 503 shutting_down, exit 0;
a rolling restart of two processes sharing one port (SO_REUSEPORT) drops no prediction.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from bitserve_client import BitserveClient
from service.db import Database
from service.settings import Settings
from service.storage import Storage
from tests.chaos.resilience_fixtures import ApiProcess, Load, Outcome, png, publish_tiny_model
from tests.integration.conftest import make_key, make_settings
from tests.services import _free_port

GRACE_S = 20.0  # BITSERVE_SHUTDOWN_GRACE_SECONDS of the gateways under test
EXIT_LIMIT_S = GRACE_S + 10.0


def _settings(tmp_path: Path, migrated_db: str, redis_url: str) -> Settings:
    return make_settings(
        tmp_path / "home",
        migrated_db,
        redis_url,
        shutdown_grace_seconds=GRACE_S,
        predict_rate_per_second=10_000.0,  # the load is not what these tests limit
        predict_burst=10_000,
    )


def _model_and_key(settings: Settings) -> tuple[str, str]:
    db = Database(settings.database_url)
    try:
        return publish_tiny_model(db, Storage(settings.artifact_root)), make_key(db, settings)
    finally:
        db.dispose()


def _multipart(image: bytes) -> tuple[bytes, str]:
    boundary = "bitserve-chaos-boundary"
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="files"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    body += image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_sigterm_finishes_the_request_in_flight_and_refuses_new_ones(
    tmp_path: Path, migrated_db: str, redis_url: str
) -> None:
    settings = _settings(tmp_path, migrated_db, redis_url)
    model_id, key = _model_and_key(settings)
    port = _free_port()
    api = ApiProcess(settings, port, tmp_path / "api.log").start()
    auth = {"Authorization": f"Bearer {key}"}
    try:
        # An open keep-alive connection, idle when the signal comes.
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        idle.request("GET", "/v1/models", headers=auth)
        first = idle.getresponse()
        first.read()
        assert first.status == 200
        # A predict request in flight: its headers and half its body sent, the rest later.
        body, content_type = _multipart(png())
        slow = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        slow.putrequest("POST", f"/v1/models/{model_id}/predict")
        for name, value in {**auth, "Content-Type": content_type}.items():
            slow.putheader(name, value)
        slow.putheader("Content-Length", str(len(body)))
        slow.endheaders()
        slow.send(body[: len(body) // 2])
        time.sleep(1.0)  # the app is reading the body: the request is in flight

        signalled = time.monotonic()
        api.terminate()
        time.sleep(0.5)
        # A new request on the open connection: refused, and the connection is closed.
        idle.request("GET", "/v1/models", headers=auth)
        refused = idle.getresponse()
        refused_body = json.loads(refused.read())
        assert refused.status == 503, refused_body
        assert refused_body["error"]["code"] == "shutting_down"
        assert refused.getheader("Retry-After") == "1"
        assert refused.getheader("Connection") == "close"
        # No new connection is accepted any more (the only listener on this port is closed).
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert api.proc is not None and api.proc.poll() is None  # still draining
        # The request in flight completes normally.
        slow.send(body[len(body) // 2 :])
        answer = slow.getresponse()
        answered = json.loads(answer.read())
        assert answer.status == 200, answered
        assert [len(p["top_k"]) for p in answered["predictions"]] == [3]
        code = api.wait(EXIT_LIMIT_S)
        drain_s = time.monotonic() - signalled
    finally:
        api.kill()
    assert code == 0, api.log()[-3000:]
    assert "drained in" in api.log()
    print(f"\nSIGTERM with one request in flight: exit code 0 {drain_s:.2f} s after the signal")


class CountingTransport(httpx.HTTPTransport):
    """What the wire did under the client's retries: each answer's status and code, and each
    connection lost."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = super().handle_request(request)
        except httpx.TransportError as exc:
            with self.lock:
                self.seen.append(type(exc).__name__)
            raise
        with self.lock:
            self.seen.append(str(response.status_code))
        return response


def test_rolling_restart_of_two_gateways_drops_no_prediction(
    tmp_path: Path, migrated_db: str, redis_url: str
) -> None:
    settings = _settings(tmp_path, migrated_db, redis_url)
    model_id, key = _model_and_key(settings)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    old = [ApiProcess(settings, port, tmp_path / f"api-{name}.log") for name in ("a", "b")]
    for api in old:
        api.start()
    new: list[ApiProcess] = []
    transport = CountingTransport()
    client = BitserveClient(url, api_key=key, max_retries=5, transport=transport)
    image = png()

    def send(_: int) -> Outcome:
        started = time.monotonic()
        try:
            client.predict(model_id, [image], top_k=1)
        except Exception as exc:  # every failure the client lets through is counted
            return Outcome("predict", started, time.monotonic() - started, None, error=repr(exc))
        return Outcome("predict", started, time.monotonic() - started, 200)

    codes: list[int] = []
    drains: list[float] = []
    try:
        with Load(send, threads=4) as load:
            time.sleep(2.0)
            for index, api in enumerate(old):
                signalled = time.monotonic()
                api.terminate()
                codes.append(api.wait(EXIT_LIMIT_S))
                drains.append(time.monotonic() - signalled)
                new.append(ApiProcess(settings, port, tmp_path / f"api-{index}-new.log").start())
                time.sleep(1.0)
            time.sleep(2.0)
        outcomes = load.snapshot()
    finally:
        client.close()
        for api in old + new:
            api.kill()

    failed = [o for o in outcomes if o.status != 200]
    shutting_down = sum(
        1
        for api in old
        for record in _access_records(api.log())
        if record["method"] == "POST"
        and record["path"].startswith("/v1/models/")
        and record["status"] == 503
    )
    lost = [s for s in transport.seen if not s.isdigit()]
    assert codes == [0, 0], [api.log()[-2000:] for api in old]
    assert not failed, failed[:5]
    assert len(outcomes) >= 100, len(outcomes)
    assert set(transport.seen) <= {"200", "503", *lost}, sorted(set(transport.seen))
    # The load moved to the first replacement while the second old process drained (the
    # clients' keep-alive connections stay on it afterwards: the last one may see none).
    assert any(
        r["method"] == "POST" and r["path"].startswith("/v1/models/")
        for r in _access_records(new[0].log())
    )
    print(
        f"\nrolling restart of 2 gateways: {len(outcomes)} predictions, 0 failed; on the wire "
        f"{transport.seen.count('503')} x 503 shutting_down and {len(lost)} lost connection(s) "
        f"({', '.join(sorted(set(lost))) or 'none'}), all retried by the client; "
        f"drains {', '.join(f'{d:.2f} s' for d in drains)}, exit codes {codes}; "
        f"slowest prediction {max(o.seconds for o in outcomes):.2f} s "
        f"(503s in the stopped gateways' logs: {shutting_down})"
    )


def _access_records(log: str) -> list[dict[str, Any]]:
    """uvicorn's access lines of a `bitserve api` log (JSON lines, service.log_format)."""
    records = []
    for line in log.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("logger") == "uvicorn.access":
                records.append(record)
    return records
