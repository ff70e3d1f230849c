"""A job's `deploy_to` with a real worker (issue 16): the first job makes the deployment; a
job asked to deploy only if better is compared with the deployment's target on its own
validation split, both as served, and deploys only when strictly better; the job records what
happened, and the deployment's history names the job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from bitcore.models import create_model
from bitserve_client import BitserveClient
from tests.imagegen import make_image_folder
from tests.integration.cli_helpers import run_cli
from tests.integration.conftest import JobServer
from tests.integration.worker_fixtures import FAST_OVERRIDES
from tests.model_fixtures import publish_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CLASSES = ["ant", "bee", "cow"]
TIMEOUT = 180
# Trained long enough to beat a model that always answers the first class.
OVERRIDES = {**FAST_OVERRIDES, "steps": 40}


@pytest.fixture(scope="module")
def dataset(job_server: JobServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = make_image_folder(
        tmp_path_factory.mktemp("deploy") / "train", dict.fromkeys(CLASSES, 8), seed=4
    )
    with _api(job_server) as api:
        return api.upload_dataset(folder)["id"]


def _api(job_server: JobServer) -> BitserveClient:
    return BitserveClient(job_server.server.url, api_key=job_server.server.key)


def _train(job_server: JobServer, dataset: str, **deploy: Any) -> dict[str, Any]:
    with _api(job_server) as api:
        job = api.create_job(
            dataset, "tiny-R10x0.25", OVERRIDES, validation_fraction=0.25, seed=3, **deploy
        )
        assert (job["deploy_to"], job["deploy_if_better"], job["deployment"]) == (
            deploy.get("deploy_to"),
            deploy.get("deploy_if_better", False),
            None,
        )
        try:
            api.wait_for_job(job["id"], timeout=TIMEOUT)
        except Exception:
            print(job_server.worker.log()[-4000:])
            raise
        return dict(api.get_job(job["id"]))


def _first_class_model(job_server: JobServer) -> str:
    """A model whose head is all zeros: every image gets equal scores, so it answers the first
    class: accuracy 1/3 on a balanced split."""
    torch.manual_seed(0)
    model = create_model("tiny-R10x0.25", len(CLASSES), zero_head=True)
    state = job_server.server.app.state
    model_id, _ = publish_model(state.db, state.storage, model, "tiny-R10x0.25", CLASSES, 32)
    return model_id


def test_a_job_makes_the_deployment_then_a_job_not_better_leaves_it(
    job_server: JobServer, dataset: str
) -> None:
    first = _train(job_server, dataset, deploy_to="insects")
    assert first["status"] == "succeeded"
    outcome = first["deployment"]
    assert outcome is not None
    assert (outcome["deployment"], outcome["deployed"], outcome["action"], outcome["version"]) == (
        "insects",
        True,
        "created",
        1,
    )
    server = job_server.server
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        deployment = http.get("/v1/deployments/insects").json()
        assert deployment["targets"] == [{"model_id": first["model_id"], "weight": 1}]

    # The same data, seed and schedule: the same model again, so not strictly better.
    second = _train(job_server, dataset, deploy_to="insects", deploy_if_better=True)
    kept = second["deployment"]
    assert kept is not None
    assert (kept["action"], kept["deployed"], kept["version"]) == ("kept", False, 1)
    assert kept["incumbent_model_id"] == first["model_id"]
    assert kept["accuracy"] == kept["incumbent_accuracy"]
    assert kept["accuracy"] == pytest.approx(first["metrics"]["accuracy"], abs=1e-9)
    assert "does not beat" in kept["reason"]
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        deployment = http.get("/v1/deployments/insects").json()
        history = http.get("/v1/deployments/insects/history").json()["items"]
    assert deployment["version"] == 1
    assert deployment["targets"] == [{"model_id": first["model_id"], "weight": 1}]
    assert [(h["version"], h["action"], h["actor"]) for h in history] == [
        (1, "created", first["id"])
    ]


def test_a_better_model_is_deployed_and_the_shadow_kept(
    job_server: JobServer, dataset: str
) -> None:
    weak, shadow = _first_class_model(job_server), _first_class_model(job_server)
    server = job_server.server
    body = {"name": "better", "model_id": weak, "shadow_model_id": shadow}
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        assert http.post("/v1/deployments", json=body).status_code == 201
    job = _train(job_server, dataset, deploy_to="better", deploy_if_better=True)
    outcome = job["deployment"]
    assert outcome is not None
    assert (outcome["action"], outcome["deployed"], outcome["version"]) == ("updated", True, 2)
    assert outcome["incumbent_model_id"] == weak
    assert outcome["incumbent_accuracy"] == pytest.approx(1 / 3, abs=1e-9)  # 2 of 6 images
    assert outcome["accuracy"] > outcome["incumbent_accuracy"]
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        deployment = http.get("/v1/deployments/better").json()
        history = http.get("/v1/deployments/better/history").json()["items"]
    assert deployment["targets"] == [{"model_id": job["model_id"], "weight": 1}]
    assert deployment["shadow_model_id"] == shadow
    assert (history[0]["version"], history[0]["action"], history[0]["actor"]) == (
        2,
        "updated",
        job["id"],
    )
    assert history[0]["before"]["targets"] == [{"model_id": weak, "weight": 1}]


def test_a_bad_deployment_name_is_refused_before_the_job_is_queued(
    job_server: JobServer, dataset: str
) -> None:
    server = job_server.server
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        refused = http.post(
            "/v1/jobs",
            json={"dataset_id": dataset, "base_model": "tiny-R10x0.25", "deploy_to": "My Pets"},
        )
        not_a_bool = http.post(
            "/v1/jobs",
            json={
                "dataset_id": dataset,
                "base_model": "tiny-R10x0.25",
                "deploy_to": "pets",
                "deploy_if_better": 1,
            },
        )
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "invalid_request")
    assert (not_a_bool.status_code, not_a_bool.json()["error"]["code"]) == (422, "invalid_request")


def test_the_cli_deploys_a_job_and_says_so(
    job_server: JobServer, dataset: str, tmp_path: Path
) -> None:
    server = job_server.server
    steps = [f"--set={key}={value}" for key, value in OVERRIDES.items()]
    args = ["jobs", "create", "--dataset", dataset, "--base-model", "tiny-R10x0.25", *steps]
    refused = run_cli(server.url, server.key, *args, "--deploy-if-better", home=tmp_path)
    assert refused.rc == 2 and "--deploy-if-better needs --deploy-to NAME" in refused.err
    done = run_cli(
        server.url, server.key, *args, "--deploy-to", "cli-pets", "--watch", home=tmp_path
    )
    assert done.rc == 0, done.err
    lines = done.out.strip().splitlines()  # the summary lines end stdout (no --json)
    assert lines[-1] == "deployment cli-pets: created (v1): the deployment was made"
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        targets = http.get("/v1/deployments/cli-pets").json()["targets"]
        job = next(j for j in http.get("/v1/jobs").json()["items"] if j["deploy_to"] == "cli-pets")
    assert targets == [{"model_id": job["model_id"], "weight": 1}]
