"""Batch predictions over real HTTP with real workers (issue 15): every file of a dataset
appears exactly once in the output, with the labels and scores `POST /v1/models/{id}/predict`
answers for that file; CSV and JSONL; a file that no longer decodes gets a row with its error;
cancel (queued: at once; running: after the current shard, its files deleted); and a worker
SIGKILLed mid-run: the next one skips the shards already published, so none is computed
twice and the output has each file once."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from bitcore.data.index import DatasetIndex
from bitcore.models import create_model
from bitserve_client import ApiError, BatchPredictionFailed, BitserveClient
from bitserve_client.files import zip_folder
from service.tables import BatchPrediction
from tests.imagegen import make_image_folder
from tests.integration.conftest import JobServer, LiveServer
from tests.integration.worker_fixtures import WorkerProcess, fast_job_settings
from tests.model_fixtures import publish_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CLASSES = ["ant", "bee", "cow"]
TIMEOUT = 120
SCORE_TOLERANCE = 1e-5
WRITTEN = re.compile(r"batch prediction (bp_\w+): shard (\d+) of (\d+) written")


def _publish(server: LiveServer, crop: int, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = create_model("tiny-R10x0.25", len(CLASSES))
    state = server.app.state
    return publish_model(state.db, state.storage, model, "tiny-R10x0.25", CLASSES, crop)[0]


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


def _served(api: BitserveClient, model_id: str, folder: Path, files: list[str]) -> list[Any]:
    """What the predict route answers for each file, every class ranked."""
    return api.predict(model_id, [folder / f for f in files], top_k=len(CLASSES))


def _assert_same_scores(labels: list[tuple[str, float]], served: list[Any], k: int) -> None:
    """The row's k labels are the served ranking's first k (scores within 1e-5; a near-tie
    may swap two labels, so each label's own score is checked too)."""
    by_label = {answer["label"]: answer["score"] for answer in served}
    assert len(labels) == k
    for (label, score), answer in zip(labels, served, strict=False):
        assert score == pytest.approx(answer["score"], abs=SCORE_TOLERANCE)
        assert score == pytest.approx(by_label[label], abs=SCORE_TOLERANCE)


def _csv_rows(text: str, k: int) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    expected = ["file"]
    for rank in range(1, k + 1):
        expected += [f"label_{rank}", f"score_{rank}"]
    assert reader.fieldnames == [*expected, "error"]
    return list(reader)


def _labels(row: dict[str, str], k: int) -> list[tuple[str, float]]:
    return [
        (row[f"label_{rank}"], float(row[f"score_{rank}"]))
        for rank in range(1, k + 1)
        if row[f"label_{rank}"]
    ]


# -- on the module's job server (a live API, one solo worker) ---------------------------------


@pytest.fixture(scope="module")
def served(job_server: JobServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("batch")
    folder = make_image_folder(tmp / "photos", {"ant": 4, "bee": 3, "cow": 5}, seed=9)
    return {"model": _publish(job_server.server, crop=32), "folder": folder, "tmp": tmp}


def _api(job_server: JobServer) -> BitserveClient:
    return BitserveClient(job_server.server.url, api_key=job_server.server.key)


def test_every_file_once_with_the_labels_and_scores_predict_answers(
    job_server: JobServer, served: dict[str, Any], tmp_path: Path
) -> None:
    model_id, folder = served["model"], served["folder"]
    files = _files(folder)
    with _api(job_server) as api:
        # Not waited for: a dataset still processing is waited for by the batch prediction.
        dataset = api.upload_dataset(folder, wait=False)
        queued = api.create_batch_prediction(model_id, dataset["id"], top_k=2)
        assert (queued["status"], queued["format"], queued["top_k"]) == ("queued", "csv", 2)
        assert (queued["dataset_id"], queued["model_id"], queued["result"]) == (
            dataset["id"],
            model_id,
            None,
        )
        try:
            done = api.wait_for_batch_prediction(queued["id"], timeout=TIMEOUT)
        except Exception:
            print(job_server.worker.log()[-4000:])
            raise
        path = api.download_batch_predictions(done["id"], tmp_path)
        answers = _served(api, model_id, folder, files)
        assert next(b["id"] for b in api.list_batch_predictions(model_id)) == done["id"]

    assert path == tmp_path / f"{done['id']}-predictions.csv"
    data = path.read_bytes()
    rows = _csv_rows(data.decode(), 2)
    assert [row["file"] for row in rows] == files  # each file once, sorted by path
    for row, answer in zip(rows, answers, strict=True):
        assert row["error"] == ""
        _assert_same_scores(_labels(row, 2), answer, 2)
    assert done["result"] == {
        "rows": 12,
        "errors": 0,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert done["progress"] == {
        "shards_done": 1,
        "shards_total": 1,  # 12 files, shards of 64
        "images_done": 12,
        "images_total": 12,
    }
    assert (done["attempts"], done["error"]) == (1, None)

    # The route itself: an attachment of the right type.
    server = job_server.server
    with httpx.Client(base_url=server.url, headers=server.headers) as http:
        answer = http.get(f"/v1/batch-predictions/{done['id']}/output")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/csv")
    assert answer.headers["content-disposition"] == (
        f'attachment; filename="{done["id"]}-predictions.csv"'
    )
    assert answer.content == data


def test_jsonl_clamps_top_k_to_the_models_classes(
    job_server: JobServer, served: dict[str, Any], tmp_path: Path
) -> None:
    model_id, folder = served["model"], served["folder"]
    files = _files(folder)
    with _api(job_server) as api:
        dataset = api.upload_dataset(folder)
        queued = api.create_batch_prediction(model_id, dataset["id"], top_k=10, format="jsonl")
        done = api.wait_for_batch_prediction(queued["id"], timeout=TIMEOUT)
        path = api.download_batch_predictions(done["id"], tmp_path / "out.jsonl")
        answers = _served(api, model_id, folder, files)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["file"] for line in lines] == files
    for line, answer in zip(lines, answers, strict=True):
        assert sorted(line) == ["file", "predictions"]
        labels = [(p["label"], p["score"]) for p in line["predictions"]]
        _assert_same_scores(labels, answer, len(CLASSES))  # 10 asked, 3 classes
    assert done["top_k"] == 10 and done["format"] == "jsonl"
    assert done["result"] is not None and done["result"]["rows"] == 12
    with httpx.Client(base_url=job_server.server.url, headers=job_server.server.headers) as http:
        answer = http.get(f"/v1/batch-predictions/{done['id']}/output")
    assert answer.headers["content-type"] == "application/x-ndjson"
    assert answer.headers["content-disposition"].endswith(f'"{done["id"]}-predictions.jsonl"')


def test_an_archive_sent_with_the_request_is_predicted_with_the_form_s_options(
    job_server: JobServer, served: dict[str, Any], tmp_path: Path
) -> None:
    model_id, folder = served["model"], served["folder"]
    files = _files(folder)
    archive = zip_folder(folder, tmp_path / "photos.zip").read_bytes()
    server = job_server.server
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        answer = http.post(
            f"/v1/models/{model_id}/batch-predictions",
            files={"file": ("photos.zip", archive, "application/zip")},
            data={"top_k": "2", "format": "jsonl", "name": "sent photos"},
        )
    assert answer.status_code == 202, answer.text
    queued = answer.json()
    assert (queued["top_k"], queued["format"], queued["status"]) == (2, "jsonl", "queued")
    with _api(job_server) as api:
        assert api.get_dataset(queued["dataset_id"])["name"] == "sent photos"
        done = api.wait_for_batch_prediction(queued["id"], timeout=TIMEOUT)
        path = api.download_batch_predictions(done["id"], tmp_path / "out.jsonl")
        answers = _served(api, model_id, folder, files)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["file"] for line in lines] == files  # each file once
    for line, served_answer in zip(lines, answers, strict=True):
        labels = [(p["label"], p["score"]) for p in line["predictions"]]
        _assert_same_scores(labels, served_answer, 2)


def test_a_sent_archive_with_bad_options_is_refused_and_nothing_is_kept(
    job_server: JobServer, served: dict[str, Any], tmp_path: Path
) -> None:
    model_id, folder = served["model"], served["folder"]
    archive = zip_folder(folder, tmp_path / "photos.zip").read_bytes()
    server = job_server.server
    forms = {
        "top_k_0": {"top_k": "0"},
        "top_k_word": {"top_k": "three"},
        "format": {"format": "xml"},
        "unknown_field": {"shards": "3"},
    }
    with _api(job_server) as api:
        before = {d["id"] for d in api.list_datasets()}
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        answers = {
            name: http.post(
                f"/v1/models/{model_id}/batch-predictions",
                files={"file": ("photos.zip", archive, "application/zip")},
                data=form,
            )
            for name, form in forms.items()
        }
    refused = {name: (a.status_code, a.json()["error"]["code"]) for name, a in answers.items()}
    assert refused == dict.fromkeys(forms, (422, "invalid_request"))
    fields = {name: a.json()["error"].get("details") for name, a in answers.items()}
    assert fields["top_k_0"]["errors"][0]["loc"] == ["body", "top_k"]
    assert fields["format"]["errors"][0]["loc"] == ["body", "format"]
    with _api(job_server) as api:
        assert {d["id"] for d in api.list_datasets()} == before


def test_a_file_that_no_longer_decodes_gets_one_row_with_its_error(
    job_server: JobServer, served: dict[str, Any], tmp_path: Path
) -> None:
    model_id, folder = served["model"], served["folder"]
    files = _files(folder)
    with _api(job_server) as api:
        dataset = api.upload_dataset(folder)
        # Damaged on the server's disk after ingestion accepted it.
        settings = job_server.server.settings
        index_path = settings.artifact_root / "datasets" / dataset["id"] / "index.json"
        index = DatasetIndex.load(index_path)
        broken = next(s for s in index.samples if s.path == "bee/bee_001.png")
        index.path_of(broken).write_bytes(b"this is not an image")
        queued = api.create_batch_prediction(model_id, dataset["id"], top_k=3)
        done = api.wait_for_batch_prediction(queued["id"], timeout=TIMEOUT)
        path = api.download_batch_predictions(done["id"], tmp_path)
        good = [f for f in files if f != "bee/bee_001.png"]
        answers = dict(zip(good, _served(api, model_id, folder, good), strict=True))
    rows = _csv_rows(path.read_text(), 3)
    assert [row["file"] for row in rows] == files
    (failed,) = [row for row in rows if row["error"]]
    assert failed == {
        "file": "bee/bee_001.png",
        **{f"{kind}_{rank}": "" for rank in (1, 2, 3) for kind in ("label", "score")},
        "error": "unsupported_format",
    }
    for row in rows:
        if row is not failed:
            _assert_same_scores(_labels(row, 3), answers[row["file"]], 3)
    assert done["result"] is not None
    assert (done["result"]["rows"], done["result"]["errors"]) == (12, 1)


def test_bad_requests_are_refused_clearly(job_server: JobServer, served: dict[str, Any]) -> None:
    model_id, server = served["model"], job_server.server
    with _api(job_server) as api:
        dataset_id = next(iter(api.list_datasets()))["id"]
        with pytest.raises(ApiError) as unknown_dataset:
            api.create_batch_prediction(model_id, "ds_" + "a" * 20)
        with pytest.raises(ApiError) as unknown_model:
            api.create_batch_prediction("mdl_" + "a" * 20, dataset_id)
        with pytest.raises(ApiError) as unknown:
            api.get_batch_prediction("bp_" + "a" * 20)
    bodies = {
        "top_k_0": {"dataset_id": dataset_id, "top_k": 0},
        "top_k_true": {"dataset_id": dataset_id, "top_k": True},
        "top_k_1001": {"dataset_id": dataset_id, "top_k": 1001},
        "format": {"dataset_id": dataset_id, "format": "xml"},
        "extra": {"dataset_id": dataset_id, "shards": 3},
    }
    with httpx.Client(base_url=server.url, headers=server.headers) as http:
        answers = {
            name: http.post(f"/v1/models/{model_id}/batch-predictions", json=body)
            for name, body in bodies.items()
        }
    refused = {name: (a.status_code, a.json()["error"]["code"]) for name, a in answers.items()}
    assert refused == dict.fromkeys(bodies, (422, "invalid_request"))
    assert (unknown_dataset.value.status, unknown_dataset.value.code) == (404, "not_found")
    assert (unknown_model.value.status, unknown_model.value.code) == (404, "not_found")
    assert (unknown.value.status, unknown.value.code) == (404, "not_found")


# -- on a server of their own: shards of 2 files, stale after 4 s, workers started per test ---


@dataclass
class Slow:
    """A live API (with its ingest worker) whose train queue has no worker until a test starts
    one; 160 files in shards of 2 through a 384 px model: 80 shards, seconds of work."""

    server: LiveServer
    model_id: str
    dataset_id: str
    files: list[str]
    home: Path

    def api(self) -> BitserveClient:
        return BitserveClient(self.server.url, api_key=self.server.key)

    def row(self, batch_id: str) -> BatchPrediction:
        with self.server.app.state.db.sessionmaker() as session:
            row = session.get(BatchPrediction, batch_id)
        assert row is not None
        return row

    def wait(
        self, batch_id: str, until: Callable[[BatchPrediction], bool], what: str, timeout: float
    ) -> BatchPrediction:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.row(batch_id)
            if until(row):
                return row
            time.sleep(0.05)
        raise AssertionError(f"{batch_id}: {what} not reached in {timeout} s: {row.status}")

    def worker(self, name: str) -> WorkerProcess:
        return WorkerProcess(
            self.server.settings, roles=("train",), log_path=self.home / f"{name}.log"
        )


@pytest.fixture(scope="module")
def slow(
    tmp_path_factory: pytest.TempPathFactory, own_database: str, redis_url: str
) -> Iterator[Slow]:
    home = tmp_path_factory.mktemp("batch-slow")
    settings = fast_job_settings(
        home, database_url=own_database, broker_url=redis_url, batch_shard_size=2
    )
    server = LiveServer(settings, ingest=True).start()
    try:
        folder = make_image_folder(home / "photos", {"ant": 54, "bee": 53, "cow": 53}, seed=4)
        model_id = _publish(server, crop=384, seed=1)
        with BitserveClient(server.url, api_key=server.key) as api:
            dataset = api.upload_dataset(folder, timeout=TIMEOUT)
        yield Slow(server, model_id, dataset["id"], _files(folder), home)
    finally:
        server.stop()


def test_a_queued_batch_prediction_is_cancelled_at_once(slow: Slow) -> None:
    with slow.api() as api:
        queued = api.create_batch_prediction(slow.model_id, slow.dataset_id)
        cancelled = api.cancel_batch_prediction(queued["id"])
        with pytest.raises(ApiError) as again:
            api.cancel_batch_prediction(queued["id"])
        with pytest.raises(ApiError) as output:
            api.download_batch_predictions(queued["id"], slow.home / "never.csv")
        with pytest.raises(BatchPredictionFailed) as waited:
            api.wait_for_batch_prediction(queued["id"], timeout=5)
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert (again.value.status, again.value.code) == (409, "batch_prediction_finished")
    assert again.value.details == {"status": "cancelled"}
    assert (output.value.status, output.value.code) == (409, "not_finished")
    assert waited.value.status == "cancelled"
    assert not (slow.home / "never.csv").exists()


def test_a_running_batch_prediction_stops_after_its_shard_and_its_files_go(slow: Slow) -> None:
    with slow.worker("cancel") as worker, slow.api() as api:
        queued = api.create_batch_prediction(slow.model_id, slow.dataset_id)
        slow.wait(queued["id"], lambda r: r.shards_done >= 1, "a shard", 60)
        cancelling = api.cancel_batch_prediction(queued["id"])
        assert cancelling["status"] in ("cancelling", "cancelled")
        row = slow.wait(queued["id"], lambda r: r.status == "cancelled", "cancelled", 60)
    log = worker.log()  # stopped: its last lines are written
    assert row.shards_total == 80 and 1 <= row.shards_done < 80, log[-3000:]
    assert row.result is None
    assert not (slow.server.settings.artifact_root / "batch_predictions" / row.id).exists()
    assert f"batch prediction {row.id} cancelled" in log


def test_a_killed_worker_hands_on_and_no_shard_is_computed_twice(slow: Slow) -> None:
    """SIGKILL after 2+ shards: the next worker's reconciler gives the batch prediction back
    to the queue once its heartbeat is stale (4 s), and that worker skips every shard the
    first one published: each shard is written once in all, the output has each file once."""
    first = slow.worker("first").start()
    try:
        with slow.api() as api:
            queued = api.create_batch_prediction(slow.model_id, slow.dataset_id, format="jsonl")
        batch_id = queued["id"]
        slow.wait(batch_id, lambda r: r.shards_done >= 2, "2 shards", 60)
    finally:
        first.kill()  # SIGKILL: a machine lost mid-run
    killed = slow.row(batch_id)
    assert killed.status == "running" and killed.shards_done < killed.shards_total == 80
    shards_dir = slow.server.settings.artifact_root / "batch_predictions" / batch_id / "shards"
    # Written before the kill: every shard counted, and perhaps the one in flight.
    on_disk = {int(p.parent.name.split("-")[1]) for p in shards_dir.glob("*/rows.jsonl")}
    assert set(range(killed.shards_done)) <= on_disk
    with slow.worker("second") as second, slow.api() as api:
        try:
            done = api.wait_for_batch_prediction(batch_id, timeout=TIMEOUT, poll_interval=0.2)
        except Exception:
            print(second.log()[-4000:])
            raise
        output = api.download_batch_predictions(batch_id, slow.home / "after-kill.jsonl")
        second_log = second.log()
    assert (done["attempts"], done["progress"]["shards_done"]) == (2, 80)
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["file"] for line in lines] == slow.files  # each of the 160 files once
    assert all(len(line["predictions"]) == 3 for line in lines)

    first_wrote, second_wrote = (
        Counter(int(m[2]) for m in WRITTEN.finditer(log) if m[1] == batch_id)
        for log in (first.log(), second_log)
    )
    # The shards written before the kill were never written again; every other one was
    # written once, by the second worker.
    assert set(second_wrote) == set(range(80)) - on_disk
    assert set(second_wrote.values()) == {1}
    assert set(first_wrote) <= on_disk and set(first_wrote.values()) == {1}
    assert len(on_disk - set(first_wrote)) <= 1  # killed between writing a shard and its log
    skipped = re.search(rf"batch prediction {batch_id}: (\d+) of 80 shards were done", second_log)
    assert skipped is not None and int(skipped[1]) == len(on_disk)
    assert not shards_dir.exists()  # the output replaced them
