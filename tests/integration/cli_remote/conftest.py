"""The fixtures of `bitserve datasets|jobs|models|predict` against a REAL uvicorn server and
Celery worker (tests/integration/conftest.py `job_server`), module-scoped: each test module
follows one dataset through. `uploaded` is `datasets upload` (which waits for ingestion),
`watched` a job created with --watch (tiny-R10x0.25 from scratch, 12 steps at 32 px), `job` what
the API answers for it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.imagegen import make_image_folder
from tests.integration.cli_helpers import FAST, REPO_ROOT, Cli, Run, run_cli
from tests.integration.conftest import JobServer


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-home")


@pytest.fixture(scope="module")
def cli(job_server: JobServer, home: Path) -> Cli:
    server = job_server.server

    def run(
        *args: str, key: str | None = server.key, url: str = server.url, cwd: Path = REPO_ROOT
    ) -> Run:
        return run_cli(url, key, *args, home=home, cwd=cwd)

    return run


@pytest.fixture(scope="module")
def api(job_server: JobServer) -> httpx.Client:
    server = job_server.server
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        yield http  # type: ignore[misc]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("cli-data") / "pets", {"cat": 6, "dog": 6})


@pytest.fixture(scope="module")
def uploaded(cli: Cli, images: Path) -> Run:
    return cli("datasets", "upload", str(images))


@pytest.fixture(scope="module")
def dataset_id(uploaded: Run) -> str:
    assert uploaded.rc == 0, uploaded.err
    match = re.fullmatch(r"dataset (ds_[a-z2-7]{20}) ready: .*", uploaded.lines[-1])
    assert match, uploaded.out
    return match.group(1)


@pytest.fixture(scope="module")
def watched(cli: Cli, dataset_id: str, job_server: JobServer) -> Run:
    run = cli(
        "jobs",
        "create",
        "--dataset",
        dataset_id,
        "--base-model",
        "tiny-R10x0.25",
        *FAST,
        "--validation-fraction",
        "0.25",
        "--name",
        "cli-job",
        "--watch",
    )
    assert run.rc == 0, f"{run.out}\n{run.err}\n{job_server.worker.log()[-4000:]}"
    return run


@pytest.fixture(scope="module")
def job(watched: Run, api: httpx.Client) -> dict[str, Any]:
    job_id = watched.lines[-1].split()[1]
    answer = api.get(f"/v1/jobs/{job_id}")
    assert answer.status_code == 200
    return dict(answer.json())
