"""/v1/datasets over real HTTP (uvicorn) against the real PostgreSQL, with a real Celery
ingest worker: an upload is answered 202 `processing`, then ingested to ready or failed."""

from __future__ import annotations

import os
import socket
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from bitcore.data.index import DatasetIndex
from service.db import Database
from service.ids import new_id
from service.settings import Settings
from service.tables import Dataset, Job
from tests.imagegen import make_archive, make_image_folder
from tests.integration.conftest import LiveServer
from tests.integration.datasets_helpers import upload_ended, upload_failed, upload_ready
from tests.model_fixtures import fixture_plan

pytestmark = pytest.mark.integration

CLASSES = {"cat": 5, "dog": 4, "emu": 3}
SIZES = [(40, 48), (32, 64), (50, 50)]  # cycled per class: medians 40 (height) and 50 (width)
CORRUPT = {"cat/broken.png": "truncated", "dog/readme.jpg": "text", "emu/empty.gif": "empty"}
SMALL_LIMIT = 20_000


@pytest.fixture(scope="module")
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.database_url)
    yield database
    database.dispose()


def _upload(
    client: httpx.Client, archive: Path, name: str | None = None, filename: str | None = None
) -> httpx.Response:
    data = {"name": name} if name is not None else None
    with archive.open("rb") as handle:
        files = {"file": (filename or archive.name, handle, "application/octet-stream")}
        return client.post("/v1/datasets", files=files, data=data)


def _dataset_archive(tmp_path: Path, kind: str, classes: dict[str, int] | None = None) -> Path:
    folder = make_image_folder(
        tmp_path / "flowers", classes or CLASSES, size=SIZES, corrupt=CORRUPT, top_level="flowers"
    )
    (folder / "flowers" / "emu" / "more.zip").write_bytes(b"PK\x03\x04 nested")
    return make_archive(folder, kind)


def _small(tmp_path: Path, classes: dict[str, int], kind: str = "zip") -> Path:
    folder = make_image_folder(tmp_path / f"small-{len(os.listdir(tmp_path))}", classes)
    return make_archive(folder, kind)


def _ready(client: httpx.Client, archive: Path, **fields: str) -> str:
    return str(upload_ready(client, archive, filename=archive.name, **fields)["id"])


def _refused(client: httpx.Client, archive: Path) -> dict[str, object]:
    return upload_failed(client, archive, filename=archive.name)


def _leftovers(store: Path) -> tuple[list[str], list[str]]:
    """Files in tmp/, and folders in uploads/ and datasets/ (a refused upload keeps none)."""
    tmp = sorted(p.name for p in (store / "tmp").iterdir()) if (store / "tmp").exists() else []
    folders = [
        f"{kind}/{p.name}"
        for kind in ("uploads", "datasets")
        if (store / kind).exists()
        for p in (store / kind).iterdir()
    ]
    return tmp, sorted(folders)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_upload_creates_a_ready_dataset(
    client: httpx.Client, settings: Settings, db: Database, tmp_path: Path, kind: str
) -> None:
    archive = _dataset_archive(tmp_path, kind)
    response = _upload(client, archive)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["id"].startswith("ds_") and len(accepted["id"]) == 23
    assert response.headers["location"] == f"/v1/datasets/{accepted['id']}"
    # The answer comes once the archive is stored: nothing is known of its images yet.
    assert accepted["status"] == "processing" and accepted["finished_at"] is None
    assert accepted["progress"]["phase"] in ("queued", "extracting", "indexing", "storing")
    assert (accepted["num_images"], accepted["image_size"], accepted["error"]) == (0, None, None)

    body = upload_ended(client, archive, filename=archive.name)  # a second one, to the end
    assert body["status"] == "ready" and body["progress"] is None and body["error"] is None
    assert body["name"] == "flowers"  # from the file name, suffix removed
    assert body["num_images"] == 12 and body["num_classes"] == 3
    assert body["classes"] == [
        {"name": "cat", "count": 5},
        {"name": "dog", "count": 4},
        {"name": "emu", "count": 3},
    ]
    assert body["image_size"] == {"median_height": 40, "median_width": 50}
    assert body["rejected"] == [
        {"path": "flowers/cat/broken.png", "reason": "undecodable"},
        {"path": "flowers/dog/readme.jpg", "reason": "unsupported_format"},
        {"path": "flowers/emu/empty.gif", "reason": "empty"},
        {"path": "flowers/emu/more.zip", "reason": "nested_archive"},
    ]
    assert body["bytes"] == archive.stat().st_size
    assert body["created_at"].endswith("Z") and body["finished_at"] >= body["created_at"]

    assert client.get(f"/v1/datasets/{body['id']}").json() == body
    with db.session() as session:
        row = session.get(Dataset, body["id"])
        assert row is not None and row.num_images == 12 and row.tenant_id == "default"
        assert row.attempts == 1 and row.worker_id is None
        key = row.storage_key
    directory = settings.artifact_root / key
    assert key == f"datasets/{body['id']}"
    index = DatasetIndex.load(directory / "index.json")
    assert index.counts() == {"cat": 5, "dog": 4, "emu": 3}
    files = [p for p in (directory / "files").rglob("*") if p.is_file()]
    assert len(files) == 12  # the rejected members are not kept
    # The training cache is built by the node that trains, not at ingestion.
    assert not (directory / "cache").exists()
    # The uploaded archive is gone once ingested; no temp file is left behind.
    assert not (settings.artifact_root / "uploads" / body["id"]).exists()
    assert _leftovers(settings.artifact_root)[0] == []


def test_name_field_is_used(client: httpx.Client, tmp_path: Path) -> None:
    response = _upload(client, _small(tmp_path, {"a": 2, "b": 2}), name="  my pets ")
    assert response.status_code == 202 and response.json()["name"] == "my pets"
    response = _upload(client, _small(tmp_path, {"a": 2, "b": 2}), name="x" * 201)
    assert response.status_code == 422 and response.json()["error"]["details"] == {"field": "name"}


def test_wrong_type_is_judged_by_content(client: httpx.Client, tmp_path: Path) -> None:
    fake = tmp_path / "photos.zip"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    response = client.post(
        "/v1/datasets", files={"file": ("photos.zip", fake.read_bytes(), "application/zip")}
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    # Neither multipart nor JSON (JSON is a dataset source: tests/integration/
    # test_dataset_sources.py).
    response = client.post(
        "/v1/datasets", content=b"file=x", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 415
    # JSON without a source: the body's checks name the field.
    response = client.post("/v1/datasets", json={"file": "x"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
    # Multipart without the file part.
    response = client.post("/v1/datasets", files=[("name", (None, b"x"))])  # type: ignore[list-item]
    assert response.status_code == 422
    assert response.json()["error"]["details"] == {"field": "file"}
    # A part the form does not take (issue 11: only the known fields) is named.
    response = client.post("/v1/datasets", files={"other": ("a.zip", b"PK\x03\x04")})
    assert response.status_code == 422
    assert response.json()["error"]["details"] == {"field": "other"}


@pytest.fixture
def small_server(
    settings: Settings, start_server: Callable[..., LiveServer], tmp_path: Path
) -> LiveServer:
    return start_server(
        settings.model_copy(
            update={
                "max_upload_bytes": SMALL_LIMIT,
                "artifact_root": tmp_path / "small-store",
                "ingest_queue": f"ingest-small-{tmp_path.name}",
            }
        ),
        ingest=True,
    )


def _incompressible_zip(path: Path, size: int) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a/x.bin", os.urandom(size))
    return path


def test_too_big_with_content_length(small_server: LiveServer, tmp_path: Path) -> None:
    archive = _incompressible_zip(tmp_path / "big.zip", 3 * SMALL_LIMIT)
    with httpx.Client(base_url=small_server.url, timeout=30, headers=small_server.headers) as http:
        response = _upload(http, archive)
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["code"] == "payload_too_large"
        assert error["details"] == {"limit_bytes": SMALL_LIMIT}
        # Just under the limit is accepted as far as size goes (then refused as a dataset).
        fits = _incompressible_zip(tmp_path / "fits.zip", SMALL_LIMIT - 1000)
        assert _refused(http, fits)["code"] == "too_few_classes"
    assert _leftovers(small_server.settings.artifact_root) == ([], [])


def test_too_big_chunked_without_content_length(small_server: LiveServer) -> None:
    boundary = "bitservetestboundary"
    sent = []

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="big.zip"\r\nContent-Type: application/zip\r\n\r\nPK\x03\x04'
        ).encode()
        for _ in range(10):
            chunk = os.urandom(8192)
            sent.append(len(chunk))
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    request = httpx.Request(
        "POST",
        f"{small_server.url}/v1/datasets",
        content=body(),
        headers={
            "content-type": f"multipart/form-data; boundary={boundary}",
            **small_server.headers,
        },
    )
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    with httpx.Client(timeout=30) as http:
        response = http.send(request)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert _leftovers(small_server.settings.artifact_root) == ([], [])


def _raw_request_head(server: LiveServer, length: int, boundary: str = "b0undary") -> bytes:
    return (
        f"POST /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {server.key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_declared_length_over_the_cap_is_refused_before_the_body(small_server: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", small_server.port), timeout=10) as sock:
        sock.sendall(_raw_request_head(small_server, 10**12))  # and never a body byte
        reply = sock.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413 ")
    assert '"code":"payload_too_large"' in reply


def test_truncated_multipart_body_is_malformed(client: httpx.Client, settings: Settings) -> None:
    body = b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n\r\nPK'
    response = client.post(
        "/v1/datasets",
        content=body,
        headers={"content-type": "multipart/form-data; boundary=b0undary"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_request"
    assert _leftovers(settings.artifact_root)[0] == []


def test_client_disconnect_removes_the_temp_file(small_server: LiveServer) -> None:
    tmp_dir = small_server.settings.artifact_root / "tmp"
    head = _raw_request_head(small_server, SMALL_LIMIT - 10)
    part = (
        b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a.zip"\r\n\r\n'
        + b"PK\x03\x04"
        + bytes(4000)
    )
    with socket.create_connection(("127.0.0.1", small_server.port), timeout=10) as sock:
        sock.sendall(head + part)
        assert _wait_for(lambda: any(tmp_dir.glob("upload-*"))), "upload never reached disk"
    # Socket closed mid-body: the server notices and removes the partial file.
    assert _wait_for(lambda: not any(tmp_dir.glob("upload-*")))
    assert _leftovers(small_server.settings.artifact_root) == ([], [])


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_too_few_classes_and_images(
    client: httpx.Client, settings: Settings, tmp_path: Path
) -> None:
    before = _leftovers(settings.artifact_root)
    error = _refused(client, _small(tmp_path, {"only": 4}))
    assert error["code"] == "too_few_classes"
    assert error["details"] == {"classes": [{"name": "only", "count": 4}]}
    assert error["message"] == "need at least 2 class folders, found 1: only"

    error = _refused(client, _small(tmp_path, {"cat": 3, "dog": 1, "emu": 0}, "tar.gz"))
    assert error["code"] == "too_few_images"
    assert error["details"] == {
        "classes": [{"name": "dog", "count": 1}, {"name": "emu", "count": 0}],
        "min_images_per_class": 2,
    }
    assert _leftovers(settings.artifact_root) == before  # upload and dataset folders removed


def test_unsafe_archive_is_refused(
    client: httpx.Client, settings: Settings, tmp_path: Path
) -> None:
    before = _leftovers(settings.artifact_root)
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("cat/a.png", b"x")
        out.writestr("../../escape.png", b"x")
    error = _refused(client, archive)
    assert error["code"] == "archive_unsafe"
    assert error["details"] == {"path": "../../escape.png", "reason": "path_traversal"}
    assert _leftovers(settings.artifact_root) == before


def test_unknown_ids_answer_404(client: httpx.Client) -> None:
    for path in (
        "/v1/datasets/ds_aaaaaaaaaaaaaaaaaaaa",
        "/v1/datasets/not-an-id",
        "/v1/datasets/ds_aaaaaaaaaaaaaaaaaaaa/plan",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    assert client.delete("/v1/datasets/ds_aaaaaaaaaaaaaaaaaaaa").status_code == 404


def test_list_paginates_newest_first(client: httpx.Client, db: Database, tmp_path: Path) -> None:
    ids = []
    for _ in range(3):
        response = _upload(client, _small(tmp_path, {"a": 2, "b": 2}))
        assert response.status_code == 202
        ids.append(response.json()["id"])
    first = client.get("/v1/datasets", params={"limit": 2}).json()
    assert [d["id"] for d in first["items"]] == [ids[2], ids[1]]
    assert first["next_cursor"]
    second = client.get("/v1/datasets", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert second["items"][0]["id"] == ids[0]

    seen, cursor = [], None
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/datasets", params=params).json()
        assert len(page["items"]) <= 2
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    with db.session() as session:
        stored = session.scalars(
            sa.select(Dataset.id)
            .where(Dataset.tenant_id == "default")
            .order_by(Dataset.created_at.desc(), Dataset.id.desc())
        ).all()
    assert seen == list(stored)  # every dataset exactly once, in order


def test_delete_refused_while_a_job_uses_it(
    client: httpx.Client, settings: Settings, db: Database, tmp_path: Path
) -> None:
    dataset_id = _ready(client, _small(tmp_path, {"a": 2, "b": 2}))
    directory = settings.artifact_root / "datasets" / dataset_id
    assert (directory / "index.json").is_file()
    job_id = new_id("job")
    with db.session() as session:
        session.add(
            Job(
                id=job_id,
                dataset_id=dataset_id,
                base_model="tiny-R10x0.25",
                status="running",
                plan=fixture_plan(32),
            )
        )
    response = client.delete(f"/v1/datasets/{dataset_id}")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "dataset_in_use"
    assert response.json()["error"]["details"] == {"jobs": [job_id]}
    assert directory.is_dir()

    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = "succeeded"
    response = client.delete(f"/v1/datasets/{dataset_id}")
    assert response.status_code == 204 and response.content == b""
    assert not directory.exists()
    assert client.get(f"/v1/datasets/{dataset_id}").status_code == 404
    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 404
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.dataset_id is None  # ON DELETE SET NULL


def test_plan_endpoint(client: httpx.Client, tmp_path: Path) -> None:
    dataset_id = _ready(client, _dataset_archive(tmp_path, "zip"))
    body = client.get(f"/v1/datasets/{dataset_id}/plan").json()
    assert body["dataset_id"] == dataset_id and body["base_model"] == "BiT-M-R50x1"
    plan = body["plan"]
    # 12 images of median 40x50 (< 96x96 px): 160/128 px, the small-dataset schedule.
    assert (plan["precrop"], plan["crop"], plan["batch_size"]) == (160, 128, 512)
    assert (plan["warmup_steps"], plan["decay_steps"], plan["total_steps"]) == (
        100,
        [200, 300, 400],
        500,
    )
    assert (plan["base_lr"], plan["mixup_alpha"], plan["zero_head"]) == (0.003, 0.0, True)
    assert plan["source"]["overridden"] == [] and plan["source"]["image_size"] == [40, 50]
    # Validation 0.1 takes round-half-up per class, at least one: 5-1, 4-1, 3-1 = 9 to train.
    assert plan["source"]["num_examples"] == 9 and body["validation_fraction"] == 0.1
    assert plan["source"]["from_scratch"] is False
    assert body["estimate"]["training_examples"] == 9
    assert body["estimate"]["images_processed"] == 500 * 512
    assert body["estimate"]["epochs"] == round(500 * 512 / 9, 2)
    assert body["estimate"]["seconds"] is None

    params: dict[str, str | int] = {
        "base_model": "tiny-R10x0.25",
        "steps": 50,
        "batch_size": 8,
        "crop": 96,
    }
    body = client.get(f"/v1/datasets/{dataset_id}/plan", params=params).json()
    plan = body["plan"]
    assert (plan["warmup_steps"], plan["decay_steps"], plan["total_steps"]) == (
        10,
        [20, 30, 40],
        50,
    )
    assert (plan["batch_size"], plan["crop"], plan["precrop"]) == (8, 96, 160)
    assert plan["source"]["overridden"] == ["batch_size", "crop", "steps"]
    assert plan["source"]["from_scratch"] is True  # unpublished variant: no checkpoint
    assert body["estimate"]["images_processed"] == 400

    body = client.get(f"/v1/datasets/{dataset_id}/plan", params={"validation_fraction": 0.0}).json()
    assert body["estimate"]["training_examples"] == 12

    response = client.get(f"/v1/datasets/{dataset_id}/plan", params={"base_model": "ResNet-9000"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "unknown_base_model"
    response = client.get(f"/v1/datasets/{dataset_id}/plan", params={"crop": 200})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_override"
    assert response.json()["error"]["details"] == {"field": "overrides.crop"}
    for bad in ({"steps": 0}, {"validation_fraction": 1.0}, {"batch_size": "many"}):
        response = client.get(f"/v1/datasets/{dataset_id}/plan", params=bad)
        assert response.status_code == 422, bad
        assert response.json()["error"]["code"] == "invalid_request"
