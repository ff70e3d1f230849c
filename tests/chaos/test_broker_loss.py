"""Redis, the broker, is SIGKILLed with jobs in flight and restarted empty on the same port:
every message is lost. The database is the source of truth, so nothing may be lost with it:
the running job carries on, the queued jobs are sent again by the reconciler (it finds its
marker key gone: Redis lost its data), the worker reconnects and consumes again, and every
job succeeds exactly once. While Redis is down a new job and a new upload are still recorded
(quickly; the upload is ingested once Redis is back) and /readyz names the broker.

The reconciler runs at its production interval (30 s) and jobs go stale only after 30 s, so
the recovery measured here comes from the broker-loss path, not from short test timeouts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from service.broker import Broker
from service.ids import utcnow
from service.tables import Dataset, Job, Model
from tests.chaos.recovery_fixtures import PrivateRedis, wait_until
from tests.imagegen import make_archive, make_image_folder
from tests.integration.conftest import LiveServer, start_server  # noqa: F401
from tests.integration.datasets_helpers import post_archive, wait_dataset
from tests.integration.worker_fixtures import (
    FAST_OVERRIDES,
    WorkerProcess,
    add_dataset,
    fast_job_settings,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DOWN_REQUEST_LIMIT_S = 5.0  # POST /v1/jobs and /readyz answer this fast with Redis gone
BACK_WITHIN_S = 60.0  # after Redis returns, every job is in flight again within this
JOBS_DONE_TIMEOUT_S = 150.0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_redis_restarted_empty_loses_no_job(
    tmp_path: Path,
    migrated_db: str,
    redis_server: PrivateRedis,
    start_server: Callable[..., LiveServer],  # noqa: F811
) -> None:
    settings = fast_job_settings(
        tmp_path,
        database_url=migrated_db,
        broker_url=redis_server.url,
        job_stale_after_seconds=30.0,
        reconcile_interval_seconds=30.0,
    )
    server = start_server(settings)
    db, storage = server.app.state.db, server.app.state.storage
    dataset_id = add_dataset(db, storage, tenant_id="default")
    archive = make_archive(make_image_folder(tmp_path / "pets", {"cat": 4, "dog": 4}))
    http = httpx.Client(base_url=server.url, headers=server.headers, timeout=30)

    def post_job() -> tuple[dict[str, Any], float]:
        started = time.monotonic()
        response = http.post(
            "/v1/jobs",
            json={
                "dataset_id": dataset_id,
                "base_model": "tiny-R10x0.25",
                "overrides": FAST_OVERRIDES,
            },
        )
        took = time.monotonic() - started
        assert response.status_code == 202, response.text
        return dict(response.json()), took

    def dataset_row(dataset_id: str) -> Dataset:
        with db.sessionmaker() as session:
            found = session.get(Dataset, dataset_id)
            assert found is not None
            return found

    def rows(ids: list[str]) -> dict[str, Job]:
        with db.sessionmaker() as session:
            found = session.scalars(sa.select(Job).where(Job.id.in_(ids))).all()
            return {job.id: job for job in found}

    with WorkerProcess(settings, pool="solo") as worker:
        # The reconciler's start-up pass marks the fresh Redis.
        marker = Broker(settings).marker_key.encode()
        wait_until(
            lambda: marker in redis_server.stored_keys(),
            30,
            "marker",
            worker.log,
        )
        ids = [post_job()[0]["id"] for _ in range(3)]
        first = ids[0]
        wait_until(
            lambda: rows([first])[first].status == "running", 60, "the first job runs", worker.log
        )
        states = {job_id: job.status for job_id, job in rows(ids).items()}
        assert sorted(states.values()) == ["queued", "queued", "running"], states

        redis_server.kill()
        killed = time.monotonic()
        started = time.monotonic()
        ready = http.get("/readyz")
        readyz_took = time.monotonic() - started
        assert ready.status_code == 503, ready.text
        assert list(ready.json()["error"]["details"]["failing"]) == ["broker"]
        during, post_took = post_job()
        assert during["status"] == "queued"
        ids.append(during["id"])
        assert readyz_took < DOWN_REQUEST_LIMIT_S and post_took < DOWN_REQUEST_LIMIT_S
        assert http.get(f"/v1/jobs/{during['id']}").json()["status"] == "queued"
        assert rows([during["id"]])[during["id"]].enqueued_at is None  # not sent: recorded
        # An upload is stored and recorded as processing too; its ingest message waits.
        started = time.monotonic()
        upload = post_archive(http, archive, filename="pets.zip", name="during")
        upload_took = time.monotonic() - started
        assert upload.status_code == 202, upload.text
        assert upload.json()["status"] == "processing"
        uploaded = upload.json()["id"]
        assert upload_took < DOWN_REQUEST_LIMIT_S
        assert dataset_row(uploaded).sent_at is None
        # The running job finishes while Redis is away (its worker writes to the database
        # only); the worker then loses its broker connection and must reconnect by itself.
        wait_until(
            lambda: rows([first])[first].status == "succeeded", 60, "the running job", worker.log
        )
        time.sleep(max(0.0, 8.0 - (time.monotonic() - killed)))  # down for at least 8 s

        redis_server.start()  # same port, empty: the queued jobs' messages are gone
        returned, returned_at = time.monotonic(), utcnow()
        down_for = returned - killed
        lost = [job_id for job_id in ids if rows([job_id])[job_id].status == "queued"]
        assert len(lost) == 3  # two sent before the kill, one recorded during it

        def sent_again() -> bool:
            jobs = rows(lost)
            return all(
                jobs[j].status != "queued"
                or (jobs[j].enqueued_at is not None and _after(jobs[j].enqueued_at, returned_at))
                for j in lost
            )

        wait_until(sent_again, BACK_WITHIN_S, "queued jobs sent again", worker.log)
        resent_s = time.monotonic() - returned
        wait_until(
            lambda: any(job.status != "queued" for job in rows(lost).values()),
            BACK_WITHIN_S,
            "the worker consumes again",
            worker.log,
        )
        claimed_s = time.monotonic() - returned
        running_s = (
            wait_until(
                lambda: all(job.status != "queued" for job in rows(lost).values()),
                BACK_WITHIN_S,
                "every job ran again",
                worker.log,
            )
            + claimed_s
        )
        assert http.get("/readyz").status_code == 200
        after, _ = post_job()  # the gateway's producer reconnected too: sent at once
        ids.append(after["id"])
        assert rows([after["id"]])[after["id"]].enqueued_at is not None
        wait_until(
            lambda: all(job.status == "succeeded" for job in rows(ids).values()),
            JOBS_DONE_TIMEOUT_S,
            "every job succeeded",
            worker.log,
        )
        done_s = time.monotonic() - returned
        # The upload made while Redis was down was sent by the reconciler and ingested once.
        ingested = wait_dataset(http, uploaded, timeout=BACK_WITHIN_S)
        assert ingested["status"] == "ready", (ingested, worker.log()[-4000:])
        assert ingested["num_images"] == 8
        assert dataset_row(uploaded).attempts == 1

        # Again with the worker idle, waiting on the queue (a Celery worker has been known to
        # stop consuming after such a restart): it must reconnect and take the next job.
        redis_server.kill()
        time.sleep(3.0)
        redis_server.start()
        back = time.monotonic()
        idle, _ = post_job()
        ids.append(idle["id"])
        wait_until(
            lambda: rows([idle["id"]])[idle["id"]].status != "queued",
            BACK_WITHIN_S,
            "the idle worker consumes after the restart",
            worker.log,
        )
        idle_s = time.monotonic() - back
        wait_until(
            lambda: rows([idle["id"]])[idle["id"]].status == "succeeded",
            JOBS_DONE_TIMEOUT_S,
            "the job after the idle restart succeeded",
            worker.log,
        )
        log = worker.log()

    final = rows(ids)
    assert {job_id: (job.status, job.attempts) for job_id, job in final.items()} == {
        job_id: ("succeeded", 1) for job_id in ids
    }, log[-6000:]
    with db.sessionmaker() as session:
        models = session.scalars(sa.select(Model.job_id).where(Model.job_id.in_(ids))).all()
    assert sorted(models) == sorted(ids)  # one model per job: none ran twice
    assert "the broker lost its messages" in log
    print(
        f"\nRedis down {down_for:.1f} s: /readyz 503 (broker) in {readyz_took:.2f} s, POST /v1/jobs "
        f"202 queued in {post_took:.2f} s, POST /v1/datasets 202 in {upload_took:.2f} s. After Redis returned empty: the 3 queued jobs were "
        f"in the broker again after {resent_s:.1f} s, the worker consumed again after "
        f"{claimed_s:.1f} s, all 3 had run (one worker, one job at a time) after "
        f"{running_s:.1f} s, all {len(ids) - 1} jobs succeeded after {done_s:.1f} s. Idle worker, "
        f"Redis restarted: a new job ran {idle_s:.1f} s after Redis returned"
    )


def _after(stamp: datetime, reference: datetime) -> bool:
    if stamp.tzinfo is None:
        reference = reference.replace(tzinfo=None)
    return stamp >= reference
