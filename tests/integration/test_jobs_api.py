"""/v1/jobs over real HTTP (uvicorn) on PostgreSQL, with the messages checked in real Redis.

No worker listens on this module's train queue (only an ingest worker, for the upload), so jobs
stay queued unless a test moves them
through the real state machine (service.jobs) itself.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from bitcore import hyperrule
from bitcore.train.callbacks import Progress
from bitcore.train.history import TrainingHistory
from service import job_runs, jobs
from service.db import Database
from service.settings import Settings
from tests.imagegen import make_archive, make_image_folder
from tests.integration.conftest import LiveServer, make_settings
from tests.integration.datasets_helpers import upload_ready

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CLASSES = {"cat": 5, "dog": 4, "emu": 3}
# 10% validation, stratified, at least one per class held out: 4 + 3 + 2 training images.
TRAIN_IMAGES = 9
OVERRIDES: dict[str, Any] = {"steps": 40, "batch_size": 8}


@pytest.fixture(scope="module")
def server(
    migrated_db: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("jobs-api"),
        migrated_db,
        redis_url,
        train_queue=f"train-api-{uuid.uuid4().hex[:8]}",
    )
    live = LiveServer(settings, ingest=True).start()  # uploads become ready datasets
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30, headers=server.headers) as client:
        yield client


@pytest.fixture(scope="module")
def queue(server: LiveServer, redis_url: str) -> Iterator[Queue]:
    q = Queue(redis_url, server.settings.train_queue)
    yield q
    q.close()


@pytest.fixture(scope="module")
def dataset(http: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("jobs-api-data")
    archive = make_archive(make_image_folder(tmp / "pets", CLASSES, size=(40, 48)), "zip")
    return upload_ready(http, archive, filename="pets.zip")


class Queue:
    """The Celery messages waiting in a Redis list (kombu's Redis transport layout)."""

    def __init__(self, url: str, name: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.name = name

    def job_ids(self) -> list[str]:
        ids = []
        for raw in self.client.lrange(self.name, 0, -1):
            message = json.loads(raw)
            assert message["headers"]["task"] == "bitserve.finetune"
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            ids.append(args[0])
        return ids

    def close(self) -> None:
        self.client.close()


def _post(http: httpx.Client, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return http.post("/v1/jobs", json=body, headers=headers)


def _body(dataset: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"dataset_id": dataset["id"], "base_model": "tiny-R10x0.25", **extra}


def test_create_job_answers_the_hyperrule_plan(
    http: httpx.Client, dataset: dict[str, Any], queue: Queue
) -> None:
    response = _post(http, _body(dataset, overrides=OVERRIDES, name="pets"))
    assert response.status_code == 202, response.text
    job = response.json()
    size = (dataset["image_size"]["median_height"], dataset["image_size"]["median_width"])
    assert size == (40, 48)
    expected_plan = hyperrule.plan(TRAIN_IMAGES, size, **OVERRIDES).to_dict()
    expected_plan["source"]["from_scratch"] = True
    assert job["plan"] == expected_plan
    assert job["plan"]["source"]["num_examples"] == TRAIN_IMAGES
    assert job["plan"]["source"]["overridden"] == ["batch_size", "steps"]
    assert job["id"].startswith("job_") and job["status"] == "queued"
    assert (job["dataset_id"], job["base_model"], job["name"]) == (
        dataset["id"],
        "tiny-R10x0.25",
        "pets",
    )
    assert job["progress"] == {
        "step": 0,
        "total_steps": 40,
        "loss": None,
        "lr": None,
        "images_per_second": None,
        "eta_seconds": None,
        "phase": None,
        "downloaded_bytes": None,
        "total_bytes": None,
    }
    assert (job["attempts"], job["error"], job["model_id"], job["metrics"]) == (0, None, None, None)
    assert job["serving_precision"] == "fp32"  # the default: no int8 guard
    assert job["created_at"].endswith("Z") and job["started_at"] is None
    assert job["finished_at"] is None
    assert queue.job_ids().count(job["id"]) == 1  # committed, then sent
    fetched = http.get(f"/v1/jobs/{job['id']}")
    assert fetched.status_code == 200 and fetched.json() == job


@pytest.mark.parametrize(
    ("change", "status", "code", "field"),
    [
        ({"dataset_id": "ds_" + "a" * 20}, 404, "not_found", None),
        ({"base_model": "BiT-Q-R9x9"}, 422, "unknown_base_model", "base_model"),
        # Bounds and types: the request model's (issue 11); how values fit: the planner's.
        ({"overrides": {"steps": -1}}, 422, "invalid_request", "overrides.steps"),
        ({"overrides": {"crop": 500}}, 422, "invalid_override", "overrides.crop"),
        ({"overrides": {"epochs": 2}}, 422, "invalid_request", "overrides.epochs"),
        ({"overrides": {"batch_size": "big"}}, 422, "invalid_request", "overrides.batch_size"),
        ({"validation_fraction": 1.5}, 422, "invalid_request", None),
        ({"serving_precision": "bf16"}, 422, "invalid_request", "serving_precision"),
        ({"colour": "blue"}, 422, "invalid_request", None),
    ],
)
def test_bad_job_requests_are_refused(
    http: httpx.Client,
    dataset: dict[str, Any],
    queue: Queue,
    change: dict[str, Any],
    status: int,
    code: str,
    field: str | None,
) -> None:
    before = queue.job_ids()
    response = _post(http, {**_body(dataset), **change})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if field is not None:
        assert error["details"]["field"] == field
        assert field.split(".")[-1] in error["message"]
    assert queue.job_ids() == before


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "the body is not valid JSON"),
        # Not UTF-8: FastAPI cannot even decode it (found by tests/fuzz), same answer.
        (b'{"dataset_id": "\xff\xfe"}', "the body could not be parsed"),
    ],
)
def test_an_unparseable_body_is_a_malformed_request(
    http: httpx.Client, queue: Queue, body: bytes, message: str
) -> None:
    before = queue.job_ids()
    response = http.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["message"]) == ("malformed_request", message)
    assert queue.job_ids() == before


def test_idempotency_key(http: httpx.Client, dataset: dict[str, Any], queue: Queue) -> None:
    key = f"key-{uuid.uuid4().hex}"
    first = _post(http, _body(dataset, seed=7), key)
    again = _post(http, _body(dataset, seed=7), key)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]
    conflict = _post(http, _body(dataset, seed=8), key)
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_conflict"
    assert queue.job_ids().count(first.json()["id"]) == 1


def test_cancel_a_queued_job(http: httpx.Client, dataset: dict[str, Any]) -> None:
    job = _post(http, _body(dataset)).json()
    response = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    cancelled = response.json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"].endswith("Z")
    assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    again = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    missing = http.post("/v1/jobs/job_" + "z" * 20 + "/cancel")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_list_filter_and_paginate(http: httpx.Client, dataset: dict[str, Any]) -> None:
    mine = [_post(http, _body(dataset, seed=i)).json()["id"] for i in range(3)]
    assert http.post(f"/v1/jobs/{mine[1]}/cancel").status_code == 202

    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(100):
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = http.get("/v1/jobs", params=params).json()
        assert len(page["items"]) <= 2
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    ids = [j["id"] for j in seen]
    assert len(ids) == len(set(ids))  # no job twice across pages
    keys = [(j["created_at"], j["id"]) for j in seen]
    assert keys == sorted(keys, reverse=True)  # newest first
    assert [i for i in ids if i in mine] == mine[::-1]

    cancelled = http.get("/v1/jobs", params={"status": "cancelled", "limit": 100}).json()["items"]
    assert mine[1] in [j["id"] for j in cancelled]
    assert {j["status"] for j in cancelled} == {"cancelled"}
    queued = [
        j["id"]
        for j in http.get("/v1/jobs", params={"status": "queued", "limit": 100}).json()["items"]
    ]
    assert mine[0] in queued and mine[2] in queued and mine[1] not in queued
    assert http.get("/v1/jobs", params={"status": "asleep"}).status_code == 422
    assert http.get("/v1/jobs", params={"limit": 0}).status_code == 422
    assert http.get("/v1/jobs", params={"cursor": "!!"}).status_code == 400


def _read_events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    event, data = "message", list[str]()
    for line in response.iter_lines():
        if line.startswith(":"):
            continue  # keep-alive comment
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", list[str]()
        elif line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())


def test_events_stream_follows_the_job(
    http: httpx.Client, dataset: dict[str, Any], server: LiveServer
) -> None:
    job_id = _post(http, _body(dataset, overrides=OVERRIDES)).json()["id"]
    settings: Settings = server.settings
    db = Database(settings.database_url)
    gap = 1.2  # > the stream's 0.5 s poll: each change is seen on its own

    def worker() -> None:  # the real state machine, driven as a worker would
        time.sleep(gap)
        with db.sessionmaker() as session:
            assert job_runs.claim(session, job_id, "sse-worker", settings).claimed
            time.sleep(gap)
            progress = {
                "step": 3,
                "total_steps": 40,
                "loss": 0.5,
                "lr": 0.001,
                "images_per_second": 12.5,
                "eta_seconds": 30.0,
                "phase": "training",
            }
            job_runs.record_progress(session, job_id, "sse-worker", progress)
            time.sleep(gap)
            jobs.request_cancel(session, "default", job_id)
            time.sleep(gap)
            job_runs.finish_cancelled(session, job_id, "sse-worker")

    thread = threading.Thread(target=worker)
    events: list[tuple[str, dict[str, Any]]] = []
    with http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        thread.start()
        events = list(_read_events(response))  # the server ends the stream after `done`
    thread.join(10)
    db.dispose()
    summary = [
        (name, data["step"] if name == "progress" else data["status"]) for name, data in events
    ]
    assert summary == [
        ("status", "queued"),
        ("status", "running"),
        ("progress", 3),
        ("status", "cancelling"),
        ("status", "cancelled"),
        ("done", "cancelled"),
    ]
    progress = events[2][1]
    assert progress == {
        "id": job_id,
        "step": 3,
        "total_steps": 40,
        "loss": 0.5,
        "lr": 0.001,
        "images_per_second": 12.5,
        "eta_seconds": 30.0,
        "phase": "training",
        "downloaded_bytes": None,
        "total_bytes": None,
    }
    assert events[-1][1]["finished_at"] is not None

    # A finished job: its state and `done` at once. A missing one: a plain 404.
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert [name for name, _ in _read_events(response)] == ["status", "done"]
    missing = http.get("/v1/jobs/job_" + "q" * 20 + "/events")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_metrics_history_as_json_and_csv(
    http: httpx.Client, dataset: dict[str, Any], server: LiveServer
) -> None:
    """The curves a worker stores with its progress (bitcore.train.history), as the API
    answers them: JSON by default, CSV when asked; empty before the first step."""
    created = _post(http, _body(dataset, overrides=OVERRIDES)).json()
    job_id = created["id"]
    empty = http.get(f"/v1/jobs/{job_id}/metrics")
    assert empty.status_code == 200
    assert empty.json() == {
        "job_id": job_id,
        "status": "queued",
        "schedule": {
            "warmup_steps": created["plan"]["warmup_steps"],
            "decay_steps": created["plan"]["decay_steps"],
            "total_steps": 40,
        },
        "stride": 1,
        "max_points": 500,
        "training": [],
        "validation": [],
    }
    settings: Settings = server.settings
    db = Database(settings.database_url)
    curves = TrainingHistory()
    for step in range(1, 11):
        curves.add_progress(Progress(step, 40, 2.0 / step, 0.001 * step, 50.0, 9.0, "training"))
    curves.add_validation(10, 0.75, 0.5)
    try:
        with db.sessionmaker() as session:
            assert job_runs.claim(session, job_id, "curves-worker", settings).claimed
            progress = {"step": 10, "total_steps": 40, "phase": "training"}
            assert job_runs.record_progress(
                session, job_id, "curves-worker", progress, history=curves.to_dict()
            )
            # A worker that lost the job writes neither its progress nor its curves.
            stale = TrainingHistory()
            assert not job_runs.record_progress(
                session, job_id, "other-worker", progress, history=stale.to_dict()
            )
    finally:
        db.dispose()

    answer = http.get(f"/v1/jobs/{job_id}/metrics").json()
    assert answer["status"] == "running"
    assert [p["step"] for p in answer["training"]] == list(range(1, 11))
    assert answer["training"][3] == {
        "step": 4,
        "loss": 0.5,
        "lr": 0.004,
        "images_per_second": 50.0,
    }
    assert answer["validation"] == [{"step": 10, "accuracy": 0.75, "loss": 0.5}]

    csv_answer = http.get(f"/v1/jobs/{job_id}/metrics", headers={"Accept": "text/csv"})
    assert csv_answer.status_code == 200
    assert csv_answer.headers["content-type"] == "text/csv; charset=utf-8"
    assert f'filename="{job_id}-metrics.csv"' in csv_answer.headers["content-disposition"]
    lines = csv_answer.text.splitlines()
    assert lines[0] == "step,loss,lr,images_per_second,val_accuracy,val_loss"
    assert lines[1] == "1,2.0,0.001,50.0,,"
    assert lines[10] == "10,0.2,0.01,50.0,0.75,0.5"
    assert len(lines) == 11
    # JSON wins when listed first; an unknown id (or another tenant's) is 404.
    both = {"Accept": "application/json, text/csv"}
    assert http.get(f"/v1/jobs/{job_id}/metrics", headers=both).json()["job_id"] == job_id
    missing = http.get("/v1/jobs/job_doesnotexist000000000000/metrics")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


def test_unreachable_broker_leaves_the_job_queued(
    start_server: Any, migrated_db: str, tmp_path: Path, dataset: dict[str, Any]
) -> None:
    # Port 9 (discard) refuses connections: the send fails fast, the job is still accepted.
    settings = make_settings(tmp_path, migrated_db, "redis://127.0.0.1:9/0")
    live = start_server(settings)
    with httpx.Client(base_url=live.url, timeout=30, headers=live.headers) as client:
        started = time.monotonic()
        response = client.post("/v1/jobs", json=_body(dataset))
        assert response.status_code == 202, response.text
        assert time.monotonic() - started < 10
    db = Database(migrated_db)
    with db.sessionmaker() as session:
        job = jobs.get_job(session, "default", response.json()["id"])
        assert job.status == "queued" and job.enqueued_at is None  # for the reconciler
    db.dispose()
