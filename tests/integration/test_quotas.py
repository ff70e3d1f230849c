"""Quotas over real HTTP (uvicorn) on PostgreSQL: the (N+1)th active job and the upload past
the byte quota answer 429 with Retry-After and write nothing, the predict rate limit answers
429 under load and recovers, and admins read and set quotas (docs/operations.md, "Quotas").

One server with low default quotas; every test uses a tenant of its own.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import torch

from bitcore.models import create_model
from service.api_keys import Scope
from service.tables import Dataset, Job, Model
from tests.imagegen import class_image, encode, make_archive, make_image_folder
from tests.integration.conftest import LiveServer, make_key, make_settings
from tests.integration.datasets_helpers import upload_failed, upload_ready
from tests.model_fixtures import publish_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MAX_JOBS = 2
MAX_BYTES = 10_000_000
RATE = 5.0
BURST = 5
MAX_UPLOAD = 500_000


@pytest.fixture(scope="module")
def server(
    migrated_db: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    home = tmp_path_factory.mktemp("quotas")
    settings = make_settings(
        home,
        migrated_db,
        redis_url,
        artifact_root=home / "store",
        train_queue=f"train-quotas-{uuid.uuid4().hex[:8]}",  # no worker: jobs stay queued
        tenant_max_active_jobs=MAX_JOBS,
        tenant_max_stored_bytes=MAX_BYTES,
        predict_rate_per_second=RATE,
        predict_burst=BURST,
        max_upload_bytes=MAX_UPLOAD,
    )
    live = LiveServer(settings, ingest=True).start()  # uploads become ready datasets
    yield live
    live.stop()


@pytest.fixture(scope="module")
def admin(server: LiveServer) -> Iterator[httpx.Client]:
    """The server's global admin."""
    with httpx.Client(base_url=server.url, timeout=60, headers=server.headers) as client:
        yield client


def _tenant() -> str:
    return f"quota-{uuid.uuid4().hex[:10]}"


def _client(server: LiveServer, tenant: str, *scopes: Scope) -> httpx.Client:
    key = make_key(server.app.state.db, server.settings, tenant=tenant, scopes=scopes)
    return httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {key}"})


def _archive(tmp_path: Path) -> Path:
    folder = make_image_folder(tmp_path / f"pets-{uuid.uuid4().hex[:6]}", {"cat": 3, "dog": 3})
    return make_archive(folder, "zip")


def _upload(http: httpx.Client, archive: Path) -> httpx.Response:
    with archive.open("rb") as handle:
        return http.post("/v1/datasets", files={"file": (archive.name, handle)})


def _dataset(http: httpx.Client, tmp_path: Path) -> dict[str, Any]:
    archive = _archive(tmp_path)
    return upload_ready(http, archive, filename=archive.name)


def _job(http: httpx.Client, dataset: dict[str, Any], seed: int, key: str | None = None) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    body = {"dataset_id": dataset["id"], "base_model": "tiny-R10x0.25", "seed": seed}
    return http.post("/v1/jobs", json=body, headers=headers)


def _assert_429(response: httpx.Response, code: str, quota: str, value: object) -> Any:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["code"] == code
    assert error["details"]["quota"] == quota and error["details"]["limit"] == value
    text = f"{value:g}" if isinstance(value, float) else str(value)
    assert quota in error["message"] and f" {text}" in error["message"]
    return error


def _rows(server: LiveServer, table: Any, tenant: str) -> list[str]:
    with server.app.state.db.sessionmaker() as session:
        return list(session.scalars(sa.select(table.id).where(table.tenant_id == tenant)))


def _store_listing(server: LiveServer) -> tuple[list[str], list[str]]:
    """Files in tmp/, and the folders in datasets/ and uploads/ (stored archives)."""
    store = server.settings.artifact_root
    tmp = sorted(p.name for p in (store / "tmp").iterdir()) if (store / "tmp").exists() else []
    folders = [
        f"{kind}/{p.name}"
        for kind in ("datasets", "uploads")
        if (store / kind).exists()
        for p in (store / kind).iterdir()
    ]
    return tmp, sorted(folders)


# -- active jobs ----------------------------------------------------------------------------


def test_the_job_past_the_quota_gets_429_and_nothing_is_written(
    server: LiveServer, tmp_path: Path
) -> None:
    tenant = _tenant()
    with _client(server, tenant, Scope.TRAIN) as http:
        dataset = _dataset(http, tmp_path)
        first = _job(http, dataset, 0, key="first")
        second = _job(http, dataset, 1)
        assert (first.status_code, second.status_code) == (202, 202)
        before = sorted(_rows(server, Job, tenant))

        refused = _job(http, dataset, 2)
        error = _assert_429(refused, "quota_exceeded", "max_active_jobs", MAX_JOBS)
        assert refused.headers["retry-after"] == "30"
        assert error["details"]["current"] == MAX_JOBS
        assert sorted(_rows(server, Job, tenant)) == before  # no job row
        # An idempotent replay of a job that exists still answers, at the limit.
        replay = _job(http, dataset, 0, key="first")
        assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]

        # One ends (cancelled): a new job fits again.
        assert http.post(f"/v1/jobs/{second.json()['id']}/cancel").status_code == 202
        third = _job(http, dataset, 3)
        assert third.status_code == 202, third.text
        assert _job(http, dataset, 4).status_code == 429


def test_concurrent_creates_cannot_pass_the_quota_together(
    server: LiveServer, admin: httpx.Client, tmp_path: Path
) -> None:
    tenant = _tenant()
    put = admin.put(f"/v1/tenants/{tenant}/quotas", json={"max_active_jobs": 1})
    assert put.status_code == 200, put.text
    with _client(server, tenant, Scope.TRAIN) as http:
        dataset = _dataset(http, tmp_path)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda seed: _job(http, dataset, seed), range(8)))
    assert sorted(a.status_code for a in answers) == [202] + [429] * 7
    assert len(_rows(server, Job, tenant)) == 1


# -- stored bytes ---------------------------------------------------------------------------


def _incompressible_zip(path: Path, size: int) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a/x.bin", os.urandom(size))
    return path


def _chunked_upload(http: httpx.Client, size: int) -> httpx.Response:
    boundary = "bitservequotaboundary"

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="big.zip"\r\nContent-Type: application/zip\r\n\r\nPK\x03\x04'
        ).encode()
        for _ in range(size // 8192):
            yield os.urandom(8192)
        yield f"\r\n--{boundary}--\r\n".encode()

    request = http.build_request(
        "POST",
        "/v1/datasets",
        content=body(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert "content-length" not in request.headers
    return http.send(request)


def test_the_upload_past_the_byte_quota_gets_429_and_nothing_is_written(
    server: LiveServer, admin: httpx.Client, tmp_path: Path
) -> None:
    tenant = _tenant()
    with _client(server, tenant, Scope.TRAIN) as http:
        dataset = _dataset(http, tmp_path)
        limit = dataset["bytes"] + 20_000
        assert (
            admin.put(f"/v1/tenants/{tenant}/quotas", json={"max_stored_bytes": limit}).json()[
                "max_stored_bytes"
            ]
            == limit
        )
        rows, listing = _rows(server, Dataset, tenant), _store_listing(server)
        assert listing[0] == []  # no upload in flight

        # With Content-Length: refused before the body is read.
        big = _incompressible_zip(tmp_path / "big.zip", 30_000)
        error = _assert_429(_upload(http, big), "quota_exceeded", "max_stored_bytes", limit)
        assert error["details"]["current"] == dataset["bytes"]
        # Chunked, without Content-Length: refused while it streams, past 20,000 bytes.
        error = _assert_429(
            _chunked_upload(http, 40_000), "quota_exceeded", "max_stored_bytes", limit
        )
        assert (_rows(server, Dataset, tenant), _store_listing(server)) == (rows, listing)

        # What fits still fits (and is then judged as a dataset, by the ingest worker).
        fits = _incompressible_zip(tmp_path / "fits.zip", 15_000)
        assert upload_failed(http, fits, filename=fits.name)["code"] == "too_few_classes"
        assert _store_listing(server) == listing  # the failed one's files are removed
        usage = http.get(f"/v1/tenants/{tenant}/quotas")
        assert usage.status_code == 403  # a train key: not an admin
    usage = admin.get(f"/v1/tenants/{tenant}/quotas").json()["usage"]
    # The failed dataset does not count toward the stored bytes.
    assert usage == {"active_jobs": 0, "stored_bytes": dataset["bytes"]}


def _raw_upload_head(server: LiveServer, key: str, length: int) -> bytes:
    return (
        f"POST /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {key}\r\n"
        "Content-Type: multipart/form-data; boundary=b0undary\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_declared_lengths_are_judged_before_the_body(
    server: LiveServer, admin: httpx.Client
) -> None:
    tenant = _tenant()
    assert (
        admin.put(f"/v1/tenants/{tenant}/quotas", json={"max_stored_bytes": 1000}).status_code
        == 200
    )
    key = make_key(server.app.state.db, server.settings, tenant=tenant, scopes=(Scope.TRAIN,))
    # Over the quota but under the upload cap: 429 (retry once there is room) ...
    # ... over the upload cap: 413 (never), whatever the quota.
    for length, status in ((2000, "429"), (MAX_UPLOAD + 1, "413")):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(_raw_upload_head(server, key, length))  # and never a body byte
            reply = sock.recv(65536).decode()
        assert reply.startswith(f"HTTP/1.1 {status} "), reply
    assert _store_listing(server)[0] == []


# -- predict rate ---------------------------------------------------------------------------


def _model(server: LiveServer, tenant: str) -> str:
    torch.manual_seed(0)
    state = server.app.state
    model_id, _ = publish_model(
        state.db,
        state.storage,
        create_model("tiny-R10x0.25", 2),
        "tiny-R10x0.25",
        ["a", "b"],
        32,
        tenant_id=tenant,
    )
    return model_id


PNG = encode(class_image(0, 2, (40, 48), seed=1), "PNG")


def _predict(http: httpx.Client, model_id: str) -> httpx.Response:
    return http.post(f"/v1/models/{model_id}/predict", files=[("files", ("a.png", PNG))])


def test_the_predict_rate_answers_429_under_load_and_recovers(server: LiveServer) -> None:
    tenant = _tenant()
    model_id = _model(server, tenant)
    with _client(server, tenant, Scope.PREDICT) as http:
        started = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: _predict(http, model_id), range(30)))
        elapsed = time.monotonic() - started
        ok = [a for a in answers if a.status_code == 200]
        limited = [a for a in answers if a.status_code == 429]
        assert len(ok) + len(limited) == 30, [a.text for a in answers if a not in ok + limited]
        # The burst, then the rate: never more than the bucket could give in that time.
        assert BURST <= len(ok) <= BURST + RATE * elapsed, (len(ok), elapsed)
        assert limited, f"30 requests in {elapsed:.2f} s were never limited"
        for answer in limited:
            _assert_429(answer, "rate_limited", "predict_rate_per_second", RATE)
        wait = int(limited[-1].headers["retry-after"])
        assert wait >= 1

        # Another key of the tenant has a bucket of its own.
        with _client(server, tenant, Scope.PREDICT) as other:
            assert _predict(other, model_id).status_code == 200
        time.sleep(wait)
        assert _predict(http, model_id).status_code == 200


# -- admin routes ---------------------------------------------------------------------------


def test_admins_read_quotas_and_usage_and_only_global_admins_set_them(
    server: LiveServer, admin: httpx.Client, tmp_path: Path
) -> None:
    tenant = _tenant()
    url = f"/v1/tenants/{tenant}/quotas"
    with _client(server, tenant, Scope.ADMIN) as own:
        fresh = own.get(url)
        assert fresh.status_code == 200, fresh.text
        assert fresh.json() == {
            "tenant": tenant,
            "max_active_jobs": MAX_JOBS,
            "max_stored_bytes": MAX_BYTES,
            "predict_rate_per_second": RATE,
            "overridden": [],
            "usage": {"active_jobs": 0, "stored_bytes": 0},
        }
        dataset = _dataset(own, tmp_path)
        assert _job(own, dataset, 0).status_code == 202
        model_id = _model(server, tenant)
        model_dir = server.app.state.storage.model_dir(model_id)
        model_bytes = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
        assert model_bytes > 0
        with server.app.state.db.sessionmaker() as session:
            row = session.get(Model, model_id)
            assert row is not None and row.bytes == model_bytes  # models.bytes is filled
        usage = own.get(url).json()["usage"]
        assert usage == {"active_jobs": 1, "stored_bytes": dataset["bytes"] + model_bytes}

        # A tenant's own admin cannot raise its quota; another tenant's are not its business.
        refused = own.put(url, json={"max_active_jobs": 100})
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "insufficient_scope"
        elsewhere = f"/v1/tenants/{_tenant()}/quotas"
        assert own.get(elsewhere).status_code == 404
        assert own.put(elsewhere, json={"max_active_jobs": 100}).status_code == 404

        # A global admin sets them, partially; null is the default again.
        set_ = admin.put(url, json={"max_active_jobs": 7, "predict_rate_per_second": 1.5})
        assert set_.status_code == 200, set_.text
        body = set_.json()
        assert (body["max_active_jobs"], body["predict_rate_per_second"]) == (7, 1.5)
        assert body["max_stored_bytes"] == MAX_BYTES
        assert body["overridden"] == ["max_active_jobs", "predict_rate_per_second"]
        assert own.get(url).json() == body
        body = admin.put(url, json={"max_active_jobs": None}).json()
        assert body["max_active_jobs"] == MAX_JOBS
        assert body["overridden"] == ["predict_rate_per_second"]

        # The tenant's rate is used at once by this gateway.
        with _client(server, tenant, Scope.PREDICT) as http:
            answers = [_predict(http, model_id) for _ in range(BURST + 3)]
        limited = [a for a in answers if a.status_code == 429]
        assert limited
        _assert_429(limited[0], "rate_limited", "predict_rate_per_second", 1.5)

    for bad in ({"max_active_jobs": 0}, {"max_stored_bytes": -5}, {"burst": 3}):
        assert admin.put(url, json=bad).status_code == 422, bad
    assert admin.get("/v1/tenants/Not A Tenant/quotas").status_code == 422
