"""Two tenants run the whole loop side by side on one server and one real worker (PostgreSQL +
Redis): upload, train, predict, download, delete. Neither sees, lists, predicts with, downloads
or deletes the other's objects, and no list or /metrics answer names the other's objects.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.api_keys import Scope
from service.db import migrate
from tests.e2e.loop import LoopResult, check_loop, run_loop
from tests.integration.conftest import JobServer, make_key, running_job_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

TENANTS = ("acme", "globex")


@pytest.fixture(scope="module")
def job_server(
    tmp_path_factory: pytest.TempPathFactory, postgres_url: str, redis_url: str
) -> Iterator[JobServer]:
    migrate(postgres_url)
    with running_job_server(tmp_path_factory.mktemp("tenants"), postgres_url, redis_url) as both:
        yield both


@pytest.fixture(scope="module")
def clients(job_server: JobServer) -> Iterator[dict[str, httpx.Client]]:
    server = job_server.server
    db, settings = server.app.state.db, server.settings
    opened = {}
    for tenant in TENANTS:
        key = make_key(db, settings, tenant=tenant, scopes=(Scope.TRAIN, Scope.PREDICT))
        headers = {"Authorization": f"Bearer {key}"}
        opened[tenant] = httpx.Client(base_url=server.url, timeout=60, headers=headers)
    yield opened
    for client in opened.values():
        client.close()


def _ids(result: LoopResult) -> dict[str, str]:
    return {
        "dataset": result.dataset["id"],
        "job": result.job["id"],
        "model": result.model["id"],
    }


def test_two_tenants_share_a_server_and_see_only_their_own(
    clients: dict[str, httpx.Client], job_server: JobServer, tmp_path: Path
) -> None:
    results: dict[str, LoopResult] = {}
    errors: list[BaseException] = []

    def loop(tenant: str) -> None:
        try:
            results[tenant] = run_loop(clients[tenant], tmp_path / tenant, job_timeout=300)
        except BaseException as exc:  # reported below, with the worker's log
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(t,)) for t in TENANTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(360)
    if errors:
        print(job_server.worker.log()[-4000:])
        raise errors[0]
    for tenant in TENANTS:
        check_loop(results[tenant])

    for me, other in (TENANTS, TENANTS[::-1]):
        mine, theirs, http = _ids(results[me]), _ids(results[other]), clients[me]
        # Lists hold exactly my objects.
        assert [d["id"] for d in http.get("/v1/datasets").json()["items"]] == [mine["dataset"]]
        assert [j["id"] for j in http.get("/v1/jobs").json()["items"]] == [mine["job"]]
        assert [m["id"] for m in http.get("/v1/models").json()["items"]] == [mine["model"]]
        # The other's objects answer exactly as unknown ids do.
        for url in (
            f"/v1/datasets/{theirs['dataset']}",
            f"/v1/datasets/{theirs['dataset']}/plan",
            f"/v1/jobs/{theirs['job']}",
            f"/v1/jobs/{theirs['job']}/events",
            f"/v1/models/{theirs['model']}",
            f"/v1/models/{theirs['model']}/artifact",
        ):
            response = http.get(url)
            assert response.status_code == 404, url
            assert response.json()["error"]["code"] == "not_found"
        predict = http.post(
            f"/v1/models/{theirs['model']}/predict", files=[("files", ("a.png", b"x"))]
        )
        assert predict.status_code == 404
        job = http.post(
            "/v1/jobs", json={"dataset_id": theirs["dataset"], "base_model": "tiny-R10x0.25"}
        )
        assert job.status_code == 404
        for url in (f"/v1/models/{theirs['model']}", f"/v1/datasets/{theirs['dataset']}"):
            assert http.delete(url).status_code == 404, url
        assert http.post(f"/v1/jobs/{theirs['job']}/cancel").status_code == 404
        # My own download works.
        artifact = http.get(f"/v1/models/{mine['model']}/artifact")
        assert artifact.status_code == 200 and artifact.content[:2] == b"PK"

    # /metrics (open, no key) names no tenant and no object of either.
    metrics = httpx.get(f"{job_server.server.url}/metrics").text
    for tenant in TENANTS:
        assert tenant not in metrics
        for object_id in _ids(results[tenant]).values():
            assert object_id not in metrics

    # Each deletes its own; the other's survive until their owner deletes them.
    first, second = TENANTS
    mine = _ids(results[first])
    assert clients[first].delete(f"/v1/models/{mine['model']}").status_code == 204
    assert clients[first].delete(f"/v1/datasets/{mine['dataset']}").status_code == 204
    theirs = _ids(results[second])
    assert clients[second].get(f"/v1/models/{theirs['model']}").status_code == 200
    assert clients[second].get(f"/v1/datasets/{theirs['dataset']}").status_code == 200
    assert clients[second].delete(f"/v1/models/{theirs['model']}").status_code == 204
    assert clients[second].delete(f"/v1/datasets/{theirs['dataset']}").status_code == 204
