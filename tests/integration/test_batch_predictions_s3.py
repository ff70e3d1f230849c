"""A batch prediction whose node dies resumes on another node from the shards in the object store.

Two real Celery workers, A and B, each with a private home and artifact root, one train queue,
moto's S3 server as the store. A is SIGKILLed once two shards are counted; B (its reconciler
re-queues the stale batch prediction) fetches the shards A published instead of computing them
again, writes the rest, and publishes the output alone: the shards' objects are gone from the
bucket, and the gateway (a third root) serves the file with each of the dataset's files once.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import torch

from bitcore.models import create_model
from service.db import Database
from service.tables import BatchPrediction
from tests.imagegen import make_image_folder
from tests.integration.conftest import LiveServer
from tests.integration.test_multinode_resume import ready_dataset
from tests.integration.worker_fixtures import WorkerProcess, fast_job_settings
from tests.model_fixtures import publish_model
from tests.moto_s3 import new_bucket

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CLASSES = {"ant": 20, "bee": 20, "cow": 20}  # 60 files in shards of 2: 30 shards
SHARDS = 30
WRITTEN = re.compile(r"batch prediction (bp_\w+): shard (\d+) of \d+ written")


def bucket_keys(bucket: str, batch_id: str) -> list[str]:
    listing = boto3.session.Session().client("s3").list_objects_v2(Bucket=bucket)
    return sorted(k["Key"] for k in listing.get("Contents", []) if batch_id in k["Key"])


def test_a_batch_prediction_resumes_on_another_node_from_the_published_shards(
    s3_env: str,
    tmp_path: Path,
    migrated_db: str,
    redis_url: str,
    start_server: Callable[..., LiveServer],
) -> None:
    bucket = new_bucket()

    def node(name: str, **overrides: Any) -> Any:
        return fast_job_settings(
            tmp_path / name,
            database_url=migrated_db,
            broker_url=redis_url,
            storage_url=f"s3://{bucket}/bitserve",
            batch_shard_size=2,
            **overrides,
        )

    api = node("api")
    server = start_server(api)
    folder = make_image_folder(tmp_path / "photos", CLASSES, seed=5)
    dataset_id = ready_dataset(server, folder)
    torch.manual_seed(0)
    state = server.app.state
    model_id, _ = publish_model(
        state.db,
        state.storage,
        create_model("tiny-R10x0.25", 3),
        "tiny-R10x0.25",
        list(CLASSES),
        384,
    )
    state.storage.publish("models", model_id)
    state.storage.remove(state.storage.model_dir(model_id))  # the gateway's root: nothing
    http = httpx.Client(base_url=server.url, headers=server.headers, timeout=60)
    db = Database(migrated_db)

    def row(batch_id: str) -> BatchPrediction:
        with db.sessionmaker() as session:
            found = session.get(BatchPrediction, batch_id)
        assert found is not None
        return found

    try:
        created = http.post(
            f"/v1/models/{model_id}/batch-predictions",
            json={"dataset_id": dataset_id, "format": "jsonl", "top_k": 2},
        )
        assert created.status_code == 202, created.text
        batch_id = created.json()["id"]
        worker_a = WorkerProcess(node("a", train_queue=api.train_queue), roles=("train",)).start()
        try:
            deadline = time.monotonic() + 120
            while row(batch_id).shards_done < 2:
                assert time.monotonic() < deadline, worker_a.log()[-4000:]
                time.sleep(0.05)
        finally:
            worker_a.kill()  # SIGKILL: a machine lost mid-run
        killed = row(batch_id)
        assert killed.status == "running" and 2 <= killed.shards_done < SHARDS
        prefix = f"bitserve/batch_predictions/{batch_id}"
        manifests = [k for k in bucket_keys(bucket, batch_id) if k.endswith(".manifest.json")]
        published = {int(k.removesuffix(".manifest.json").rsplit("-", 1)[1]) for k in manifests}
        assert set(range(killed.shards_done)) <= published

        with WorkerProcess(node("b", train_queue=api.train_queue), roles=("train",)) as worker_b:
            deadline = time.monotonic() + 120
            while (current := row(batch_id)).status != "succeeded":
                assert current.status in ("running", "queued"), current.error_message
                assert time.monotonic() < deadline, worker_b.log()[-4000:]
                time.sleep(0.2)
        log_b = worker_b.log()
        # B fetched what A published and computed only the rest.
        written_b = Counter(int(m[2]) for m in WRITTEN.finditer(log_b) if m[1] == batch_id)
        assert set(written_b) == set(range(SHARDS)) - published
        assert set(written_b.values()) == {1}
        assert f"{len(published)} of {SHARDS} shards were done already" in log_b
        # Only the output is left in the store: the shards' objects were pruned.
        assert bucket_keys(bucket, batch_id) == [
            f"{prefix}.manifest.json",
            f"{prefix}/predictions.jsonl",
        ]
        answer = http.get(f"/v1/batch-predictions/{batch_id}/output")
        assert answer.status_code == 200, answer.text
        lines = [json.loads(line) for line in answer.text.splitlines()]
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
        assert [line["file"] for line in lines] == files
        assert all(len(line["predictions"]) == 2 for line in lines)
        body = http.get(f"/v1/batch-predictions/{batch_id}").json()
        assert (body["attempts"], body["result"]["rows"], body["result"]["bytes"]) == (
            2,
            60,
            len(answer.content),
        )
    finally:
        http.close()
        db.dispose()
