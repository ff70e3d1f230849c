"""The server the fuzzer talks to, and real objects on it for the fuzzer to reach.

Random ids only ever reach 404, so the hooks in test_api_fuzz.py swap in the ids of real
objects made here: a dataset, a model, a finished and a queued job, keys and a tenant. Routes
that destroy (DELETE, cancel) get objects of their own, so one deletion does not turn every
later GET of the run into a 404. The server has its own ingest worker, and every dataset made
here is ready before the fuzzing starts (/plan, /rejected and POST /v1/jobs need one; its
event stream ends at once); the datasets the fuzzer uploads are ingested as in production.
"""

from __future__ import annotations

import base64
import io
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
import torch

from bitcore.models import create_model
from service.api_keys import DEFAULT_TENANT
from service.db import migrate
from service.settings import Settings
from tests.imagegen import class_image, encode
from tests.integration.conftest import LiveServer
from tests.integration.datasets_helpers import wait_dataset
from tests.integration.worker_fixtures import FAST_OVERRIDES, fast_job_settings
from tests.model_fixtures import publish_model
from tests.services import create_database, drop_database

BASE_MODEL = "tiny-R10x0.25"
CLASSES = ["ant", "bee"]
# A request stuck on a bug must fail the run, not hang it.
HTTP_TIMEOUT_S = 30.0


def png(index: int) -> bytes:
    return encode(class_image(index % 2, 2, (36, 40), seed=index), "PNG")


def dataset_zip() -> bytes:
    """The smallest dataset the server accepts: two classes of two images, in a zip."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for i in range(4):
            archive.writestr(f"{CLASSES[i % 2]}/{i}.png", png(i))
    return out.getvalue()


@dataclass
class World:
    """Ids of real objects on the fuzz server (see the module docstring)."""

    server: LiveServer
    dataset: str  # ready, used by the queued job: DELETE answers 409
    doomed_datasets: list[str]
    model: str
    doomed_models: list[str]
    finished_job: str  # succeeded: its event stream ends at once
    queued_job: str  # no worker takes it
    doomed_keys: list[str]
    evaluation: str  # queued (no worker takes it): its examples answer 404
    batch_prediction: str  # queued (no worker takes it): its output answers 409
    deployment: str  # a name for `model`, never changed: its rollback answers 409
    doomed_deployments: list[str]
    tenant: str = DEFAULT_TENANT
    valid_bodies: dict[str, object] = field(default_factory=dict)


def _post(http: httpx.Client, path: str, **kwargs: object) -> dict[str, str]:
    response = http.post(path, **kwargs)  # type: ignore[arg-type]
    assert response.status_code in (201, 202), response.text
    body: dict[str, str] = response.json()
    return body


def _upload(http: httpx.Client, name: str) -> str:
    files = {"file": (f"{name}.zip", dataset_zip(), "application/zip")}
    return _post(http, "/v1/datasets", files=files, data={"name": name})["id"]


def _ready_datasets(http: httpx.Client, names: list[str]) -> list[str]:
    """Upload them all, then wait until every one is ready (ingested one after another)."""
    ids = [_upload(http, name) for name in names]
    for dataset_id in ids:
        body = wait_dataset(http, dataset_id)
        assert body["status"] == "ready", body
    return ids


def _publish(server: LiveServer, seed: int) -> tuple[str, str]:
    torch.manual_seed(seed)
    model = create_model(BASE_MODEL, len(CLASSES))
    state = server.app.state
    return publish_model(state.db, state.storage, model, BASE_MODEL, CLASSES, 32)


def populate(server: LiveServer, http: httpx.Client) -> World:
    dataset, *doomed_datasets = _ready_datasets(http, ["kept", "doomed-0", "doomed-1"])
    model, finished_job = _publish(server, seed=0)
    job_body = {"dataset_id": dataset, "base_model": BASE_MODEL, "overrides": FAST_OVERRIDES}
    queued_job = _post(http, "/v1/jobs", json=job_body)["id"]
    keys = [
        _post(http, "/v1/keys", json={"scopes": ["predict"], "name": f"doomed-{i}"})["id"]
        for i in range(3)
    ]
    image = base64.b64encode(png(0)).decode()
    evaluation_body = {"dataset_id": dataset}
    evaluation = _post(http, f"/v1/models/{model}/evaluations", json=evaluation_body)["id"]
    batch_body = {"dataset_id": dataset, "top_k": 2, "format": "jsonl"}
    batch = _post(http, f"/v1/models/{model}/batch-predictions", json=batch_body)["id"]
    deployments = [
        _post(http, "/v1/deployments", json={"name": name, "model_id": model})["name"]
        for name in ("kept", "doomed-0", "doomed-1")
    ]
    return World(
        server=server,
        dataset=dataset,
        doomed_datasets=doomed_datasets,
        model=model,
        doomed_models=[_publish(server, seed=i + 1)[0] for i in range(2)],
        finished_job=finished_job,
        queued_job=queued_job,
        doomed_keys=keys,
        evaluation=evaluation,
        batch_prediction=batch,
        deployment=deployments[0],
        doomed_deployments=deployments[1:],
        valid_bodies={
            "deployment": {"name": "fuzzed", "model_id": model},
            "deployment_update": {"model_id": model},
            "evaluation": evaluation_body,
            "batch_prediction": batch_body,
            "job": job_body,
            "predict_json": {"instances": [{"image_b64": image}]},
            "predict_files": {"files": [png(1), png(2)]},
            "dataset": {"file": dataset_zip(), "name": "fuzzed"},
            "evaluation_archive": {"file": dataset_zip(), "name": "fuzzed"},
            "batch_archive": {"file": dataset_zip(), "top_k": 2, "format": "csv"},
            "dataset_source": {"source": "s3://fuzz-bucket/images/", "name": "fuzzed"},
        },
    )


@contextmanager
def fuzz_world(home: Path, postgres_admin_url: str, redis_url: str) -> Iterator[World]:
    """A live server on a database of its own, with real objects on it."""
    database_url, name = create_database(postgres_admin_url)
    try:
        migrate(database_url)
        settings: Settings = fast_job_settings(
            home,
            database_url=database_url,
            broker_url=redis_url,
            # The fuzzer's predict calls must meet the code behind the rate limit, mostly.
            predict_burst=1_000_000,
            predict_rate_per_second=1_000_000.0,
        )
        # Its own ingest worker (ingest queue only: the queued job stays queued).
        server = LiveServer(settings, ingest=True).start()
        try:
            with httpx.Client(
                base_url=server.url, headers=server.headers, timeout=HTTP_TIMEOUT_S
            ) as http:
                yield populate(server, http)
        finally:
            server.stop()
            # The jobs the fuzzer started wait in the shared Redis for a worker that never
            # comes: their private queues go with the run.
            broker = redis.Redis.from_url(redis_url)
            broker.delete(settings.train_queue, settings.ingest_queue)
            broker.close()
    finally:
        drop_database(postgres_admin_url, name)
