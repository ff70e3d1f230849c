"""A job whose node dies resumes on another node from the checkpoint in the object store.

Two real Celery workers, A and B, each with a private home and artifact root (no path in
common), one train queue, moto's S3 server as the store. A trains a job until one checkpoint is
published under `jobs/<job_id>`, then is SIGKILLed (a machine lost). B, started afterwards,
re-queues the stale job (its reconciler), fetches the checkpoint and finishes the job from the
published step, not step 0; once the job ends its checkpoint objects are gone from the bucket.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from service.db import Database
from service.object_store import parse_manifest
from service.tables import Job
from tests.imagegen import make_archive, make_image_folder
from tests.integration.conftest import LiveServer
from tests.integration.datasets_helpers import upload_ready
from tests.integration.worker_fixtures import (
    FAST_OVERRIDES,
    WorkerProcess,
    fast_job_settings,
    finished,
    wait_for_job,
)
from tests.moto_s3 import new_bucket
from worker.runner import checkpoint_every

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

STEPS = 120  # a checkpoint every 12 steps: A is killed after one, long before its last
EVERY = checkpoint_every(STEPS)
CLASSES = {"cat": 6, "dog": 6}


def ready_dataset(server: LiveServer, folder: Path, name: str = "pets") -> str:
    """Upload `folder` (class sub-folders of images) through the API; the id of the dataset,
    once it is ready. The one place this test knows how the upload API answers: 202, then an
    ingest worker on a node of its own (a private root, only the bucket in common; stopped
    once the dataset is ready) makes it ready."""
    home = folder.parent / f"ingest-{name}"
    node = server.settings.model_copy(update={"home": home, "artifact_root": home / "store"})
    with (
        WorkerProcess(node, roles=("ingest",)),
        httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http,
    ):
        body = upload_ready(http, make_archive(folder), filename=f"{name}.zip", name=name)
    return str(body["id"])


def published_manifest(bucket: str, job_id: str) -> list[str] | None:
    """The paths the job's checkpoint manifest lists, or None before the first publish."""
    client = boto3.session.Session().client("s3")
    try:
        answer = client.get_object(Bucket=bucket, Key=f"bitserve/jobs/{job_id}.manifest.json")
    except client.exceptions.NoSuchKey:
        return None
    return [entry.path for entry in parse_manifest(answer["Body"].read())]


def job_keys(bucket: str, job_id: str) -> list[str]:
    listing = boto3.session.Session().client("s3").list_objects_v2(Bucket=bucket)
    return sorted(k["Key"] for k in listing.get("Contents", []) if job_id in k["Key"])


def test_a_job_resumes_on_another_node_from_the_published_checkpoint(
    s3_env: str,
    tmp_path: Path,
    own_database: str,
    redis_url: str,
    start_server: Callable[..., LiveServer],
) -> None:
    bucket = new_bucket()

    def node(name: str, **overrides: Any) -> Any:
        return fast_job_settings(
            tmp_path / name,
            database_url=own_database,
            broker_url=redis_url,
            storage_url=f"s3://{bucket}/bitserve",
            **overrides,
        )

    api = node("api")
    server = start_server(api)
    dataset_id = ready_dataset(
        server, make_image_folder(tmp_path / "pets", CLASSES, size=(40, 48), seed=3)
    )
    response = httpx.post(
        f"{server.url}/v1/jobs",
        json={
            "dataset_id": dataset_id,
            "base_model": "tiny-R10x0.25",
            "validation_fraction": 0.2,
            "seed": 0,
            "overrides": {**FAST_OVERRIDES, "steps": STEPS},
        },
        headers=server.headers,
        timeout=30,
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    db = Database(own_database)
    try:
        worker_a = WorkerProcess(node("a", train_queue=api.train_queue)).start()
        try:
            deadline = time.monotonic() + 120
            while published_manifest(bucket, job_id) is None:
                assert time.monotonic() < deadline, worker_a.log()[-4000:]
                assert worker_a.proc is not None and worker_a.proc.poll() is None
                time.sleep(0.05)
        finally:
            worker_a.kill()  # SIGKILL: no checkpoint on the way out, no release
        log_a = worker_a.log()
        # A is gone: the manifest now names the checkpoint B must resume from.
        paths = published_manifest(bucket, job_id)
        assert paths is not None and len(paths) == 2, paths
        step_dir = paths[0].split("/")[0]
        assert sorted(paths) == [f"{step_dir}/state.json", f"{step_dir}/state.safetensors"]
        published = int(step_dir.removeprefix("step-"))
        assert published > 0 and published % EVERY == 0 and published < STEPS, (published, log_a)
        # (A's "checkpoint of step N published" log line may not be written: the SIGKILL can
        # land between the manifest's write, which the loop above waits for, and the line.)
        # Only the latest checkpoint is kept: no objects of an earlier step remain.
        assert job_keys(bucket, job_id) == sorted(
            [f"bitserve/jobs/{job_id}.manifest.json"]
            + [f"bitserve/jobs/{job_id}/{p}" for p in paths]
        )
        with db.sessionmaker() as session:
            row = session.get(Job, job_id)
            assert row is not None and row.status == "running", row and row.status

        settings_b = node("b", train_queue=api.train_queue)
        assert not (settings_b.artifact_root / "jobs").exists()
        with WorkerProcess(settings_b) as worker_b:
            job = wait_for_job(db, job_id, finished, timeout=240, what="end", worker=worker_b)
            log_b = worker_b.log()
        assert job.status == "succeeded", (job.error_code, job.error_message, log_b[-4000:])
        assert job.attempts == 2
        assert f"job {job_id} resumed from step {published} " in log_b
        # The model's own record of the run: the training loop started at the published step.
        metadata = settings_b.artifact_root / "models" / str(job.model_id) / "metadata.json"
        assert json.loads(metadata.read_text())["extra"]["resumed_from"] == published
        # The job ended: its checkpoint is gone from the store and from B's disk.
        assert job_keys(bucket, job_id) == []
        assert not (settings_b.artifact_root / "jobs" / job_id).exists()
    finally:
        db.dispose()
