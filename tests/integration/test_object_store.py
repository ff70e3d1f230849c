"""Issue 12: nodes that share nothing but PostgreSQL, Redis and an object store.

One gateway, one Celery worker and a second gateway, each with a private artifact root (no
path in common), on moto's standalone S3 server: upload on gateway A (the archive goes to the
bucket's uploads/) -> the worker ingests it from the bucket into datasets/ (uploads/ goes),
trains, publishes the model -> A predicts (fetching the model into its own cache) -> gateway
B, with an empty root, serves the dataset's rejected list and the same model -> a delete on B
removes the objects, and A's cached copy is no longer served.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from service.known_models import CACHE_SECONDS
from tests.e2e.loop import CLASSES, follow_events
from tests.imagegen import class_image, encode, make_archive, make_image_folder
from tests.integration.conftest import LiveServer
from tests.integration.datasets_helpers import wait_dataset
from tests.integration.worker_fixtures import FAST_OVERRIDES, WorkerProcess, fast_job_settings
from tests.moto_s3 import new_bucket

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def bucket_keys(bucket: str) -> list[str]:
    listing = boto3.session.Session().client("s3").list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def predict(server: LiveServer, model_id: str) -> httpx.Response:
    names = sorted(CLASSES)
    images = [
        ("files", (f"{name}.png", encode(class_image(label, len(names), (40, 48), seed=500))))
        for label, name in enumerate(names)
    ]
    return httpx.post(
        f"{server.url}/v1/models/{model_id}/predict",
        files=images,
        headers=server.headers,
        timeout=60,
    )


def test_upload_train_and_serve_across_nodes_with_private_roots(
    s3_env: str,
    tmp_path: Path,
    migrated_db: str,
    redis_url: str,
    start_server: Callable[..., LiveServer],
) -> None:
    bucket = new_bucket()
    url = f"s3://{bucket}/bitserve"

    def node(name: str, **overrides: Any) -> Any:
        return fast_job_settings(
            tmp_path / name,
            database_url=migrated_db,
            broker_url=redis_url,
            storage_url=url,
            job_stale_after_seconds=30.0,
            **overrides,
        )

    api_a = node("api-a")
    # The worker consumes both of A's queues: it ingests the upload and trains.
    worker_settings = node("worker", train_queue=api_a.train_queue, ingest_queue=api_a.ingest_queue)
    roots = [api_a.artifact_root, worker_settings.artifact_root]
    server_a = start_server(api_a)
    assert httpx.get(f"{server_a.url}/readyz").status_code == 200

    # Upload on A (no worker yet): the archive is in the bucket under uploads/<id>, manifest
    # included, before the 202; A decodes nothing and keeps no copy of it.
    folder = make_image_folder(tmp_path / "pets", CLASSES, size=(40, 48), seed=3)
    (folder / "cat" / "notes.txt").write_text("not an image")  # rejected: unsupported_format
    (folder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # undecodable
    response = httpx.post(
        f"{server_a.url}/v1/datasets",
        files={"file": ("pets.zip", make_archive(folder).read_bytes(), "application/zip")},
        data={"name": "pets"},
        headers=server_a.headers,
        timeout=60,
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "processing"
    dataset_id = response.json()["id"]
    upload_prefix = f"bitserve/uploads/{dataset_id}"
    prefix = f"bitserve/datasets/{dataset_id}"
    assert [k for k in bucket_keys(bucket) if k.startswith((upload_prefix, prefix))] == [
        f"{upload_prefix}.manifest.json",
        f"{upload_prefix}/archive.zip",
    ]

    def gateway_copies() -> list[str]:
        found = []
        for kind in ("uploads", "datasets"):
            where = api_a.artifact_root / kind
            if where.is_dir():
                found += [f"{kind}/{p.name}" for p in where.iterdir()]
        return found

    assert gateway_copies() == []

    with WorkerProcess(worker_settings) as worker:
        # Ingested on the worker's node, from the bucket: uploads/<id> goes, datasets/<id> comes.
        with httpx.Client(base_url=server_a.url, headers=server_a.headers, timeout=30) as client:
            dataset = wait_dataset(client, dataset_id)
        assert dataset["status"] == "ready", (dataset, worker.log()[-3000:])
        assert dataset["num_images"] == sum(CLASSES.values())
        assert [k for k in bucket_keys(bucket) if k.startswith(upload_prefix)] == []
        assert not (worker_settings.artifact_root / "uploads" / dataset_id).exists()
        stored = {k[len(prefix) + 1 :] for k in bucket_keys(bucket) if k.startswith(prefix + "/")}
        assert f"{prefix}.manifest.json" in bucket_keys(bucket)
        assert {"index.json", "rejected.json"} <= stored
        # The training cache is built by the node that trains, not at ingestion.
        assert not any(name.startswith("cache/") for name in stored)
        assert gateway_copies() == []  # the gateway decodes nothing

        response = httpx.post(
            f"{server_a.url}/v1/jobs",
            json={
                "dataset_id": dataset_id,
                "base_model": "tiny-R10x0.25",
                "validation_fraction": 0.2,
                "seed": 0,
                "overrides": FAST_OVERRIDES,
            },
            headers=server_a.headers,
            timeout=30,
        )
        assert response.status_code == 202, response.text
        with httpx.Client(base_url=server_a.url, headers=server_a.headers) as client:
            events = follow_events(client, response.json()["id"], timeout=200)
        final = events[-1][1]
        assert final["status"] == "succeeded", (final, worker.log()[-3000:])
    model_id = final["model_id"]

    # The worker trained from its copy of what is in the bucket (plus the training-time cache
    # files it wrote there itself).
    assert stored <= files_under(worker_settings.artifact_root / "datasets" / dataset_id)
    model_prefix = f"bitserve/models/{model_id}"
    model_keys = [k for k in bucket_keys(bucket) if k.startswith(model_prefix)]
    assert sorted(model_keys) == [
        f"{model_prefix}.manifest.json",
        f"{model_prefix}/metadata.json",
        f"{model_prefix}/model.safetensors",
    ]
    # No node reads another's disk: A has no model files until its first predict fetches them.
    assert not (api_a.artifact_root / "models" / model_id).exists()
    response = predict(server_a, model_id)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == len(CLASSES)
    # The fetched artifact, and the ONNX graph this gateway exported from it to serve it
    # (BITSERVE_PREDICT_RUNTIME=onnxruntime, the default): a local derivative, never published.
    assert files_under(api_a.artifact_root / "models" / model_id) == {
        "metadata.json",
        "model.onnx",
        "model.safetensors",
    }

    # Gateway B: yet another empty root, the same model, same answers.
    api_b = node("api-b", train_queue=api_a.train_queue)
    assert api_b.artifact_root not in roots
    server_b = start_server(api_b)
    # B has no copy of the dataset: its whole rejected list is read from the bucket.
    rejected = httpx.get(
        f"{server_b.url}/v1/datasets/{dataset_id}/rejected", headers=server_b.headers, timeout=30
    )
    assert rejected.status_code == 200, rejected.text
    assert rejected.json()["items"] == [
        {"path": "cat/notes.txt", "reason": "unsupported_format"},
        {"path": "dog/broken.png", "reason": "undecodable"},
    ]
    assert rejected.json()["items"] == dataset["rejected"]
    assert not (api_b.artifact_root / "datasets" / dataset_id).exists()
    response_b = predict(server_b, model_id)
    assert response_b.status_code == 200, response_b.text
    assert response_b.json()["predictions"] == response.json()["predictions"]
    download = httpx.get(
        f"{server_b.url}/v1/models/{model_id}/artifact", headers=server_b.headers, timeout=60
    )
    assert download.status_code == 200
    weights = worker_settings.artifact_root / "models" / model_id / "model.safetensors"
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        assert sorted(archive.namelist()) == ["metadata.json", "model.safetensors"]
        assert archive.read("model.safetensors") == weights.read_bytes()

    # A tampered object in the bucket: a third gateway (empty root) refuses it, keeps nothing.
    boto3.session.Session().client("s3").put_object(
        Bucket=bucket,
        Key=f"{model_prefix}/model.safetensors",
        Body=b"\0" * len(weights.read_bytes()),
    )
    api_c = node("api-c", train_queue=api_a.train_queue)
    server_c = start_server(api_c)
    response = predict(server_c, model_id)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "model_artifact_corrupt"
    download = httpx.get(
        f"{server_c.url}/v1/models/{model_id}/artifact", headers=server_c.headers, timeout=60
    )
    assert download.status_code == 410, download.text
    assert not (api_c.artifact_root / "models").exists() or not any(
        (api_c.artifact_root / "models").iterdir()
    )

    # Deleting on B removes the objects; A, whose cache still holds the files, answers 404
    # within the documented bound (service.known_models: a model found in the database is
    # trusted for CACHE_SECONDS), and until then only its loaded copy or a 503.
    response = httpx.delete(f"{server_b.url}/v1/models/{model_id}", headers=server_b.headers)
    deleted_at = time.monotonic()
    assert response.status_code == 204
    assert [k for k in bucket_keys(bucket) if k.startswith(model_prefix)] == []
    while (status := predict(server_a, model_id).status_code) != 404:
        assert status in (200, 503)
        assert time.monotonic() - deleted_at < CACHE_SECONDS + 2.0, "still served past the bound"
        time.sleep(0.2)
    response = httpx.delete(f"{server_a.url}/v1/datasets/{dataset_id}", headers=server_a.headers)
    assert response.status_code == 204
    assert [k for k in bucket_keys(bucket) if k.startswith(prefix)] == []


def test_without_the_bucket_readiness_fails_and_uploads_keep_nothing(
    s3_env: str,
    tmp_path: Path,
    migrated_db: str,
    redis_url: str,
    start_server: Callable[..., LiveServer],
) -> None:
    settings = fast_job_settings(
        tmp_path, database_url=migrated_db, broker_url=redis_url, storage_url="s3://missing-b/p"
    )
    server = start_server(settings)
    response = httpx.get(f"{server.url}/readyz")
    assert response.status_code == 503
    assert list(response.json()["error"]["details"]["failing"]) == ["storage"]

    folder = make_image_folder(tmp_path / "pets", CLASSES, size=(40, 48), seed=3)
    response = httpx.post(
        f"{server.url}/v1/datasets",
        files={"file": ("pets.zip", make_archive(folder).read_bytes(), "application/zip")},
        data={"name": "pets"},
        headers=server.headers,
        timeout=60,
    )
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "storage_unavailable"
    assert response.headers["Retry-After"] == "5"
    # Nothing kept: no stored upload, no dataset (the gateway makes either folder only when
    # it first writes there).
    for kind in ("uploads", "datasets"):
        folder = settings.artifact_root / kind
        assert not folder.exists() or list(folder.iterdir()) == [], kind
