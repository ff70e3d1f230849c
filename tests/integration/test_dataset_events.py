"""A dataset while it is ingested, over real HTTP on PostgreSQL with real Celery ingest workers:
GET /v1/datasets/{id}/events (`status`, `progress`, `done`), its per-key cap shared with the
job streams, and what a dataset that is not ready refuses (409 `dataset_not_ready`) or allows
(DELETE).

The servers here start with no ingest worker, so an upload stays `processing` until a test
starts one (after its streams are open: every phase is then seen from the start).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.imagegen import make_archive, make_image_folder
from tests.integration.api_errors import assert_error
from tests.integration.conftest import LiveServer, make_key
from tests.integration.datasets_helpers import post_archive, upload_ended
from tests.integration.worker_fixtures import WorkerProcess, add_dataset, fast_job_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

POLL = 0.05  # the notifier's interval, and the ingest worker's progress interval
BIG = {"cat": 200, "dog": 200}  # enough images for several progress reports
TOO_FEW = {
    "code": "too_few_classes",
    "message": "need at least 2 class folders, found 1: only",
    "details": {"classes": [{"name": "only", "count": 4}]},
}


@pytest.fixture
def server(
    start_server: Callable[..., LiveServer], migrated_db: str, redis_url: str, tmp_path: Path
) -> LiveServer:
    """A server without an ingest worker (its uploads stay processing), on a store of its own."""
    settings = fast_job_settings(
        tmp_path,
        database_url=migrated_db,
        broker_url=redis_url,
        events_poll_seconds=POLL,
        job_progress_interval_seconds=POLL,
    )
    return start_server(settings)


def _archive(tmp_path: Path, name: str, classes: dict[str, int]) -> Path:
    return make_archive(make_image_folder(tmp_path / name, classes, size=(40, 48)), "zip")


def _accepted(http: httpx.Client, archive: Path) -> str:
    response = post_archive(http, archive, filename=archive.name)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "processing"
    return str(response.json()["id"])


def _folders(settings: Settings) -> list[str]:
    """The folders in uploads/ and datasets/ of the server's store."""
    store = settings.artifact_root
    return sorted(
        f"{kind}/{p.name}"
        for kind in ("uploads", "datasets")
        if (store / kind).exists()
        for p in (store / kind).iterdir()
    )


class Stream(threading.Thread):
    """One event stream read to its end in a thread: (event, data) pairs in order."""

    def __init__(self, server: LiveServer, path: str) -> None:
        super().__init__(daemon=True)
        self.server, self.path = server, path
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.status_code = 0
        self.opened = threading.Event()  # set at the first event (or a refusal)
        self.error: httpx.TransportError | None = None  # e.g. the server stopped under it

    def run(self) -> None:
        try:
            with (
                httpx.Client(
                    base_url=self.server.url, headers=self.server.headers, timeout=120
                ) as http,
                http.stream("GET", self.path) as response,
            ):
                self.status_code = response.status_code
                name = "message"
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        name = line.split(":", 1)[1].strip()
                    elif line.startswith("data:"):
                        self.events.append((name, json.loads(line.split(":", 1)[1])))
                        self.opened.set()
        except httpx.TransportError as exc:
            self.error = exc
        finally:
            self.opened.set()

    def start_and_wait(self) -> Stream:
        self.start()
        assert self.opened.wait(30), f"{self.path}: no first event"
        return self

    def ended(self, timeout: float = 120) -> list[tuple[str, dict[str, Any]]]:
        self.join(timeout)
        assert not self.is_alive(), f"{self.path} did not end: {self.events[-3:]}"
        assert (self.status_code, self.error) == (200, None)
        return self.events


def _wait_released(server: LiveServer) -> None:
    """Every stream's place given back (the server sees the end of each just after it)."""
    deadline = time.monotonic() + 10
    while server.app.state.dataset_events.streams:
        assert time.monotonic() < deadline, server.app.state.dataset_events.streams
        time.sleep(0.05)


def test_streams_follow_an_ingestion_to_ready_and_another_to_failed(
    server: LiveServer, tmp_path: Path
) -> None:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        good = _accepted(http, _archive(tmp_path, "pets", BIG))
        bad = _accepted(http, _archive(tmp_path, "one", {"only": 4}))
        streams = {
            dataset_id: Stream(server, f"/v1/datasets/{dataset_id}/events").start_and_wait()
            for dataset_id in (good, bad)
        }
        for dataset_id, stream in streams.items():
            name, first = stream.events[0]
            assert (name, first["id"], first["status"]) == ("status", dataset_id, "processing")
            assert first["progress"] == {"phase": "queued", "done": None, "total": None}

        # A third one, deleted before any worker runs: the worker finds no row and keeps nothing.
        deleted = _accepted(http, _archive(tmp_path, "gone", {"a": 2, "b": 2}))
        assert http.delete(f"/v1/datasets/{deleted}").status_code == 204
        with WorkerProcess(server.settings, roles=("ingest",)) as worker:
            ready_events = streams[good].ended()
            failed_events = streams[bad].ended()
            deadline = time.monotonic() + 60
            while f"dataset {deleted} not ingested here: not_found" not in worker.log():
                assert time.monotonic() < deadline, worker.log()[-3000:]
                time.sleep(0.1)

        # Ready: status (processing), progress while it is ingested, status (ready), done.
        ready = http.get(f"/v1/datasets/{good}").json()
        assert ready["status"] == "ready" and ready["num_images"] == 400
        others = [(name, data) for name, data in ready_events if name != "progress"]
        assert [name for name, _ in others] == ["status", "status", "done"]
        assert [data["status"] for _, data in others] == ["processing", "ready", "ready"]
        assert others[1][1] == ready and others[2][1] == ready
        progress = [data for name, data in ready_events if name == "progress"]
        assert progress, ready_events
        for data in progress:
            assert set(data) == {"id", "phase", "done", "total"} and data["id"] == good, data
            assert data["phase"] in ("extracting", "indexing", "storing"), data
        counted = [d for d in progress if d["done"] is not None]
        assert counted, progress  # at least one report of done of total
        for data in counted:
            assert 0 <= data["done"] <= data["total"], data
        indexing = [d for d in counted if d["phase"] == "indexing"]
        assert all(d["total"] == 400 for d in indexing), indexing  # the images
        # In order: the phases never go back, nor a phase's count.
        phases = ("extracting", "indexing", "storing")
        seen = [(phases.index(d["phase"]), d["done"] or 0) for d in progress]
        assert seen == sorted(seen), progress

        # Failed: no images ever indexed; the error the old 422 answered.
        failed = http.get(f"/v1/datasets/{bad}").json()
        assert failed["status"] == "failed" and failed["error"] == TOO_FEW
        others = [(name, data) for name, data in failed_events if name != "progress"]
        assert [name for name, _ in others] == ["status", "status", "done"]
        assert [data["status"] for _, data in others] == ["processing", "failed", "failed"]
        assert others[2][1] == failed and failed["progress"] is None

        # A stream on an ended dataset: its status and done at once.
        again = Stream(server, f"/v1/datasets/{good}/events").start_and_wait().ended(10)
        assert again == [("status", ready), ("done", ready)]
        _wait_released(server)
        assert http.get(f"/v1/datasets/{deleted}").status_code == 404
        assert _folders(server.settings) == [f"datasets/{good}"]  # no upload, nothing deleted


def test_events_of_unknown_or_foreign_datasets_answer_404(
    server: LiveServer, tmp_path: Path
) -> None:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        ours = _accepted(http, _archive(tmp_path, "pets", {"a": 2, "b": 2}))
        assert_error(http.get("/v1/datasets/ds_aaaaaaaaaaaaaaaaaaaa/events"), 404, "not_found")
        other = make_key(server.app.state.db, server.settings, tenant="t-events-other")
        foreign = http.get(
            f"/v1/datasets/{ours}/events", headers={"Authorization": f"Bearer {other}"}
        )
        error = assert_error(foreign, 404, "not_found")
        assert error["message"] == f"dataset {ours!r} does not exist" and error["details"] == {}
        assert server.app.state.dataset_events.streams == {}  # a refused stream holds no place


def test_dataset_and_job_streams_share_the_per_key_cap(
    start_server: Callable[..., LiveServer], server: LiveServer, tmp_path: Path
) -> None:
    capped = start_server(
        server.settings.model_copy(update={"max_streams_per_key": 2, "home": tmp_path / "c"})
    )
    state = capped.app.state
    assert state.dataset_events.streams is state.job_events.streams  # one count per key
    with httpx.Client(base_url=capped.url, headers=capped.headers, timeout=60) as http:
        processing = _accepted(http, _archive(tmp_path, "pets", {"a": 2, "b": 2}))
        ready = add_dataset(state.db, state.storage, tenant_id="default")
        job = http.post("/v1/jobs", json={"dataset_id": ready, "base_model": "tiny-R10x0.25"})
        assert job.status_code == 202, job.text  # no train worker: it stays queued
        job_path = f"/v1/jobs/{job.json()['id']}/events"
        dataset_path = f"/v1/datasets/{processing}/events"
        first = Stream(capped, dataset_path).start_and_wait()
        second = Stream(capped, job_path).start_and_wait()
        assert (first.events[0][1]["status"], second.events[0][1]["status"]) == (
            "processing",
            "queued",
        )
        for path in (dataset_path, job_path):
            refused = http.get(path)
            error = assert_error(refused, 429, "too_many_streams")
            assert error["details"] == {"limit": 2}
            assert refused.headers["retry-after"] == "5"
        # The job ends (cancelled while queued), and so does its stream.
        assert http.post(f"/v1/jobs/{job.json()['id']}/cancel").status_code == 202
        assert [name for name, _ in second.ended(30)] == ["status", "status", "done"]
        # The job stream's place is back: one more dataset stream fits, and no third.
        deadline = time.monotonic() + 10
        while True:
            with http.stream("GET", dataset_path) as extra:
                if extra.status_code == 200:
                    refused = http.get(job_path)
                    assert_error(refused, 429, "too_many_streams")
                    break
            assert time.monotonic() < deadline, "the ended stream's place was not given back"
            time.sleep(0.05)
        assert http.delete(f"/v1/datasets/{processing}").status_code == 204
        # A dataset deleted under its stream ends it: `deleted`, and its place is given back.
        events = first.ended(30)
        assert [name for name, _ in events] == ["status", "deleted"]
        assert events[-1][1] == {"id": processing}
        deadline = time.monotonic() + 10
        while state.dataset_events.streams:
            assert time.monotonic() < deadline, state.dataset_events.streams
            time.sleep(0.05)


def _assert_not_ready(http: httpx.Client, dataset_id: str, status: str) -> None:
    job = {"dataset_id": dataset_id, "base_model": "tiny-R10x0.25"}
    for response in (
        http.post("/v1/jobs", json=job),
        http.get(f"/v1/datasets/{dataset_id}/plan"),
        http.get(f"/v1/datasets/{dataset_id}/rejected"),
    ):
        error = assert_error(response, 409, "dataset_not_ready")
        assert error["details"] == {"status": status}, response.request.url
        assert dataset_id in error["message"]


def test_a_processing_or_failed_dataset_is_not_ready_for_jobs_plans_or_rejects(
    server: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        processing = _accepted(http, _archive(tmp_path, "pets", {"a": 2, "b": 2}))
        _assert_not_ready(http, processing, "processing")
        jobs = http.get("/v1/jobs", params={"limit": 100}).json()["items"]
        assert [j for j in jobs if j["dataset_id"] == processing] == []  # no job row
        assert http.get(f"/v1/datasets/{processing}").json()["status"] == "processing"
    # On the session's server (it has an ingest worker): a dataset that failed.
    failed = upload_ended(client, _archive(tmp_path, "one", {"only": 4}), filename="one.zip")
    assert (failed["status"], failed["error"]) == ("failed", TOO_FEW)
    _assert_not_ready(client, failed["id"], "failed")


def test_delete_of_a_processing_dataset_removes_its_stored_upload(
    server: LiveServer, tmp_path: Path
) -> None:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        dataset_id = _accepted(http, _archive(tmp_path, "pets", {"a": 2, "b": 2}))
        stored = server.settings.artifact_root / "uploads" / dataset_id
        assert stored.is_dir() and any(stored.iterdir())  # the archive, waiting for a worker
        assert _folders(server.settings) == [f"uploads/{dataset_id}"]
        assert http.delete(f"/v1/datasets/{dataset_id}").status_code == 204
        assert_error(http.get(f"/v1/datasets/{dataset_id}"), 404, "not_found")
        assert not stored.exists()
        assert _folders(server.settings) == []
        assert_error(http.delete(f"/v1/datasets/{dataset_id}"), 404, "not_found")
