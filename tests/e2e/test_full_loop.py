"""The whole loop over real HTTP on PostgreSQL + Redis with a REAL Celery worker process.

Dataset upload -> fine-tuning job (tiny-R10x0.25 from scratch, 40 steps at 32 px) -> progress
over Server-Sent Events -> succeeded -> model metrics -> predictions on fresh images.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.db import migrate
from service.settings import Settings
from tests.e2e.loop import check_loop, run_loop
from tests.integration.conftest import LiveServer
from tests.integration.worker_fixtures import WorkerProcess, fast_job_settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def e2e_settings(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str
) -> Settings:
    migrate(postgres_url)
    return fast_job_settings(
        tmp_path_factory.mktemp("e2e"), database_url=postgres_url, broker_url=redis_url
    )


@pytest.fixture(scope="module")
def server(e2e_settings: Settings) -> Iterator[LiveServer]:
    live = LiveServer(e2e_settings).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def worker(e2e_settings: Settings) -> Iterator[WorkerProcess]:
    # prefork, as deployed: the parent never imports training code; the job runs in a child.
    with WorkerProcess(e2e_settings, pool="prefork") as process:
        yield process


def test_upload_train_follow_predict(
    server: LiveServer, worker: WorkerProcess, tmp_path: Path
) -> None:
    with httpx.Client(base_url=server.url, timeout=60, headers=server.headers) as client:
        result = run_loop(client, tmp_path)
        try:
            check_loop(result)
        except AssertionError:
            print(worker.log()[-4000:])
            raise
        # The job's own view agrees with the model's.
        job = client.get(f"/v1/jobs/{result.job['id']}").json()
        assert job["status"] == "succeeded" and job["attempts"] == 1
        assert job["model_id"] == result.model["id"]
        assert job["metrics"]["accuracy"] == result.model["metrics"]["accuracy"]
        # The model is listed and can be downloaded.
        listed = client.get("/v1/models", params={"limit": 100}).json()["items"]
        assert result.model["id"] in [m["id"] for m in listed]
        assert client.get(f"/v1/models/{result.model['id']}/artifact").status_code == 200
