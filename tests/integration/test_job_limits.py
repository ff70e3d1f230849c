"""Issue 11, part "jobs": no job request can exhaust a worker, over real HTTP.

Each test replays a finding's original request against a LiveServer (PostgreSQL, Redis) and
asserts the documented refusal, then that the server still answers. The wall-clock limit runs
a real Celery worker.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from bitcore import costs, hyperrule
from bitcore.models import create_model
from tests.imagegen import make_archive, make_image_folder
from tests.integration.api_errors import assert_error
from tests.integration.conftest import LiveServer, make_settings
from tests.integration.datasets_helpers import upload_ready
from tests.integration.worker_fixtures import (
    WorkerProcess,
    fast_job_settings,
    finished,
    wait_for_job,
)
from tests.model_fixtures import publish_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CLASSES = {"cat": 5, "dog": 4, "emu": 3}
NUM_IMAGES = 12
# The finding's request: every size far past anything a worker can hold.
HUGE = {"precrop": 10_000_000, "crop": 10_000_000, "batch_size": 1_000_000_000}
HUGE_STEPS = 1_000_000_000_000


@pytest.fixture(scope="module")
def server(
    migrated_db: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("job-limits"),
        migrated_db,
        redis_url,
        train_queue=f"train-limits-{uuid.uuid4().hex[:8]}",  # no worker: jobs stay queued
    )
    live = LiveServer(settings, ingest=True).start()  # uploads become ready datasets
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60, headers=server.headers) as client:
        yield client


@pytest.fixture(scope="module")
def dataset_id(http: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("job-limits-data")
    archive = make_archive(make_image_folder(tmp / "pets", CLASSES, size=(40, 48)), "zip")
    return str(upload_ready(http, archive, filename="pets.zip")["id"])


def _job_ids(http: httpx.Client) -> set[str]:
    return {j["id"] for j in http.get("/v1/jobs", params={"limit": 100}).json()["items"]}


def _assert_healthy(http: httpx.Client, dataset_id: str) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    plan = http.get(f"/v1/datasets/{dataset_id}/plan", params={"base_model": "tiny-R10x0.25"})
    assert plan.status_code == 200, plan.text


# -- typed, bounded overrides ---------------------------------------------------------------


def test_unbounded_plan_overrides_are_refused(http: httpx.Client, dataset_id: str) -> None:
    # GET /v1/datasets/{id}/plan?precrop=10000000&crop=10000000&batch_size=1000000000&
    # steps=1000000000000 answered 200.
    params = {**HUGE, "steps": HUGE_STEPS}
    response = http.get(f"/v1/datasets/{dataset_id}/plan", params=params)
    error = assert_error(response, 422, "invalid_request")
    assert error["details"]["field"] == "steps"  # the first of the query's parameters
    assert {tuple(e["loc"]) for e in error["details"]["errors"]} == {
        ("query", "steps"),
        ("query", "batch_size"),
        ("query", "crop"),
        ("query", "precrop"),
    }
    assert "less than or equal to 100000" in error["message"]
    _assert_healthy(http, dataset_id)


def test_unbounded_job_overrides_are_refused(http: httpx.Client, dataset_id: str) -> None:
    # POST /v1/jobs accepted the same overrides (steps 1e12: an ETA of 3.2e11 s).
    before = _job_ids(http)
    body = {"dataset_id": dataset_id, "overrides": {**HUGE, "steps": HUGE_STEPS}}
    error = assert_error(http.post("/v1/jobs", json=body), 422, "invalid_request")
    assert error["details"]["field"] == "overrides.steps"
    assert {tuple(e["loc"]) for e in error["details"]["errors"]} == {
        ("body", "overrides", name) for name in ("steps", "batch_size", "crop", "precrop")
    }
    assert _job_ids(http) == before  # nothing was queued
    _assert_healthy(http, dataset_id)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"crop": 1025, "precrop": 1024}, "overrides.crop"),
        ({"precrop": 1025}, "overrides.precrop"),
        ({"batch_size": 4097}, "overrides.batch_size"),
        ({"micro_batch_size": 4097}, "overrides.micro_batch_size"),
        ({"steps": 100_001}, "overrides.steps"),
        ({"warmup_steps": 100_001}, "overrides.warmup_steps"),
        ({"base_lr": 10.5}, "overrides.base_lr"),
        ({"mixup_alpha": 11}, "overrides.mixup_alpha"),
        ({"steps": 0}, "overrides.steps"),
        ({"steps": True}, "overrides.steps"),  # strict: true is not 1 step
        ({"steps": "5"}, "overrides.steps"),
        ({"epochs": 3}, "overrides.epochs"),  # extra="forbid"
    ],
)
def test_each_override_bound_names_its_field(
    http: httpx.Client, dataset_id: str, overrides: dict[str, Any], field: str
) -> None:
    body = {"dataset_id": dataset_id, "base_model": "tiny-R10x0.25", "overrides": overrides}
    error = assert_error(http.post("/v1/jobs", json=body), 422, "invalid_request")
    assert error["details"]["field"] == field
    assert field in error["message"]


def test_overrides_at_their_bounds_are_accepted(http: httpx.Client, dataset_id: str) -> None:
    limits = hyperrule.MAX_OVERRIDE
    at_max = {"crop": limits["crop"], "precrop": limits["precrop"], "steps": limits["steps"]}
    plan = http.get(
        f"/v1/datasets/{dataset_id}/plan",
        params={"base_model": "tiny-R10x0.25", "batch_size": 1, **at_max},
    )
    assert plan.status_code == 200, plan.text
    assert plan.json()["plan"]["total_steps"] == 100_000
    body = {
        "dataset_id": dataset_id,
        "base_model": "tiny-R10x0.25",
        "overrides": {"batch_size": 4096, "micro_batch_size": 4096, "steps": 10},
    }
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    http.post(f"/v1/jobs/{response.json()['id']}/cancel")
    # How the bounded values fit together stays the planner's: crop over precrop.
    crossed = {**body, "overrides": {"crop": 1024, "precrop": 512}}
    error = assert_error(http.post("/v1/jobs", json=crossed), 422, "invalid_override")
    assert error["details"] == {"field": "overrides.crop"}


# -- the estimated cost -----------------------------------------------------------------------


def test_plan_shows_the_estimated_cost(http: httpx.Client, dataset_id: str) -> None:
    body = http.get(f"/v1/datasets/{dataset_id}/plan").json()  # BiT-M-R50x1, the rule's plan
    plan = hyperrule.Plan.from_dict(body["plan"])
    archive_bytes = http.get(f"/v1/datasets/{dataset_id}").json()["bytes"]
    expected = costs.estimate("BiT-M-R50x1", plan, NUM_IMAGES, archive_bytes)
    assert body["cost"] == expected.to_dict()
    # 12 images of 40 x 48 at precrop 160 are 0.9 MB of pixels, but each is cached in at most
    # its own file's bytes: the bound is twice the ~57 kB archive.
    assert 2 * archive_bytes < NUM_IMAGES * 160 * 160 * 3
    assert body["cost"]["cache_bytes"] == 2 * archive_bytes
    assert body["cost"]["images_processed"] == 500 * 512
    assert body["cost"]["micro_batch_size"] == 1  # chosen at run time: one image must fit
    # R50x1 at 128 px: ~25M float32 parameters x 3 plus ~39 MB of activations per image.
    assert 300e6 < body["cost"]["memory_bytes"] < 400e6


def test_a_job_past_the_memory_limit_is_refused(http: httpx.Client, dataset_id: str) -> None:
    # Each value within its bound, together far past any worker: what batch_size 1e9 did.
    before = _job_ids(http)
    overrides = {"batch_size": 4096, "micro_batch_size": 4096, "crop": 1024, "precrop": 1024}
    body = {"dataset_id": dataset_id, "base_model": "BiT-M-R152x4", "overrides": overrides}
    error = assert_error(http.post("/v1/jobs", json=body), 422, "job_too_expensive")
    details = error["details"]
    assert (details["resource"], details["limit"], details["setting"]) == (
        "memory_bytes",
        80 << 30,
        "BITSERVE_JOB_MAX_MEMORY_BYTES",
    )
    assert details["estimate"] > 1e13  # tens of terabytes
    assert _job_ids(http) == before
    plan = http.get(
        f"/v1/datasets/{dataset_id}/plan", params=overrides | {"base_model": body["base_model"]}
    )
    assert assert_error(plan, 422, "job_too_expensive")["details"] == details
    _assert_healthy(http, dataset_id)


def test_cache_and_images_limits_are_settings(
    migrated_db: str, redis_url: str, tmp_path: Path, start_server: Any
) -> None:
    archive = make_archive(make_image_folder(tmp_path / "pets", CLASSES, size=(40, 48)), "zip")
    archive_bytes = archive.stat().st_size  # ~57 kB
    # 12 images at 48 x 48 x 3; at 50 px their pixels are over it and under the archive bound.
    limit = NUM_IMAGES * 48 * 48 * 3
    assert limit < NUM_IMAGES * 50 * 50 * 3 < 2 * archive_bytes
    settings = make_settings(
        tmp_path,
        migrated_db,
        redis_url,
        train_queue=f"train-limits-{uuid.uuid4().hex[:8]}",
        job_max_cache_bytes=limit,
        job_max_images=1000,
    )
    live = start_server(settings, ingest=True)
    with httpx.Client(base_url=live.url, timeout=60, headers=live.headers) as client:
        dataset = upload_ready(client, archive, filename="pets.zip")
        assert dataset["bytes"] == archive_bytes
        base = {"dataset_id": dataset["id"], "base_model": "tiny-R10x0.25"}
        # precrop 1000 on a 12-image dataset: 36 MB of pixels, but each image is cached in at
        # most its own file's bytes, so the estimate is the archive's bound.
        big_cache = {**base, "overrides": {"precrop": 1000, "steps": 10, "batch_size": 4}}
        error = assert_error(client.post("/v1/jobs", json=big_cache), 422, "job_too_expensive")
        assert error["details"] == {
            "resource": "cache_bytes",
            "estimate": 2 * archive_bytes,
            "limit": limit,
            "setting": "BITSERVE_JOB_MAX_CACHE_BYTES",
        }
        assert error["message"].endswith(
            "ask for a smaller dataset (its images are cached in about their bytes)"
        )
        small = {"precrop": 50, "crop": 48, "steps": 10, "batch_size": 4}
        error = assert_error(
            client.post("/v1/jobs", json={**base, "overrides": small}), 422, "job_too_expensive"
        )
        assert error["details"]["estimate"] == NUM_IMAGES * 50 * 50 * 3
        assert error["message"].endswith("ask for a smaller precrop")
        fits = {"precrop": 48, "crop": 48}  # the cache within its limit
        long_run = {**base, "overrides": {"steps": 101, "batch_size": 10, **fits}}
        error = assert_error(client.post("/v1/jobs", json=long_run), 422, "job_too_expensive")
        assert error["details"] == {
            "resource": "images_processed",
            "estimate": 1010,
            "limit": 1000,
            "setting": "BITSERVE_JOB_MAX_IMAGES",
        }
        within = {**base, "overrides": {"steps": 100, "batch_size": 10, **fits}}
        assert client.post("/v1/jobs", json=within).status_code == 202
        assert client.get("/healthz").status_code == 200


# -- deep JSON ----------------------------------------------------------------------------------


def test_deep_json_in_overrides_is_a_4xx(http: httpx.Client, dataset_id: str) -> None:
    # A 900-deep array in `overrides` answered 500 (RecursionError in the job fingerprint).
    deep = "[" * 900 + "]" * 900
    raw = f'{{"dataset_id": "{dataset_id}", "overrides": {deep}}}'
    response = http.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
    error = assert_error(response, 422, "invalid_request")
    assert error["details"]["field"] == "overrides"
    deeper = "[" * 5000 + "]" * 5000  # past the JSON parser's own stack
    raw = f'{{"dataset_id": "{dataset_id}", "overrides": {deeper}}}'
    response = http.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, "malformed_request")
    _assert_healthy(http, dataset_id)


def test_deep_predict_json_is_a_4xx(
    http: httpx.Client, server: LiveServer, dataset_id: str
) -> None:
    # A 100k-deep predict JSON answered 500.
    state = server.app.state
    model = create_model("tiny-R10x0.25", 2)
    torch.manual_seed(0)
    model_id, _job = publish_model(state.db, state.storage, model, "tiny-R10x0.25", ["a", "b"], 32)
    raw = '{"instances": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = http.post(
        f"/v1/models/{model_id}/predict",
        content=raw,
        headers={"content-type": "application/json"},
    )
    error = assert_error(response, 400, "malformed_request")
    assert error["message"] == "the body's JSON is nested too deeply to parse"
    assert json.loads(response.text)["error"]["details"] == {}
    _assert_healthy(http, dataset_id)


# -- the wall-clock limit -------------------------------------------------------------------------


def test_a_job_past_its_time_limit_is_stopped_and_failed(
    migrated_db: str, redis_url: str, tmp_path: Path, start_server: Any
) -> None:
    # steps 1e12 held the only worker for ever; within bounds a long run still must end.
    # 10 s: the training node now builds the dataset's cache inside the limit too (it is no
    # longer built at upload), and some steps must run before the limit stops the job.
    settings = fast_job_settings(
        tmp_path,
        database_url=migrated_db,
        broker_url=redis_url,
        job_max_seconds=10.0,
    )
    live = start_server(settings)
    with (
        httpx.Client(base_url=live.url, timeout=60, headers=live.headers) as client,
        WorkerProcess(settings, pool="solo") as worker,
    ):
        archive = make_archive(make_image_folder(tmp_path / "pets", CLASSES, size=(40, 48)), "zip")
        dataset = upload_ready(client, archive, filename="pets.zip")  # the worker ingests too
        overrides = {"steps": 100_000, "batch_size": 4, "crop": 32, "precrop": 40}
        body = {"dataset_id": dataset["id"], "base_model": "tiny-R10x0.25", "overrides": overrides}
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        db = live.app.state.db
        job = wait_for_job(db, job_id, finished, timeout=120, what="the end", worker=worker)
        assert (job.status, job.error_code) == ("failed", "time_limit_exceeded"), job.error_message
        assert job.error_message is not None and "10 s" in job.error_message
        assert job.started_at is not None and job.finished_at is not None
        ran = (job.finished_at - job.started_at).total_seconds()
        assert 10.0 <= ran < 60.0  # stopped soon after the limit, long before 100k steps
        assert job.progress is not None and 0 < job.progress["step"] < 100_000
        public = client.get(f"/v1/jobs/{job_id}").json()
        assert public["error"]["code"] == "time_limit_exceeded"
        assert client.get("/healthz").status_code == 200
        assert worker.proc is not None and worker.proc.poll() is None  # stopped, not killed
