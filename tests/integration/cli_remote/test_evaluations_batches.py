"""`bitserve models evaluate|evaluations|batch-predict|batch-predictions` as a user runs them:
the `bitserve` entry point in a real subprocess (tests/integration/cli_helpers.py `run_cli`),
against a REAL uvicorn server and Celery worker on PostgreSQL + Redis (tests/integration/
conftest.py `job_server`). The model is the one a job trained (cli_remote/conftest.py `job`: a
dataset uploaded, a job watched to its end); its evaluations and batch predictions are compared
with what the API itself answers.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from bitserve_client import BitserveClient
from tests.imagegen import make_image_folder
from tests.integration.cli_helpers import Cli, Run
from tests.integration.conftest import JobServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


# -- evaluations -------------------------------------------------------------------------------

EVAL_ID = r"eval_[a-z2-7]{20}"


def evaluation_lines(evaluation: dict[str, Any]) -> list[str]:
    """The summary `models evaluate` should print for the API's evaluation (a model of 2
    classes: the API measures no top-3 accuracy for it)."""
    r = evaluation["result"]
    pairs = [f"{p['label']} -> {p['predicted']} {p['count']}" for p in r["most_confused"]]
    return [
        f"evaluation {evaluation['id']} succeeded",
        f"model: {evaluation['model_id']}",
        f"scored on: dataset {evaluation['dataset_id']}",
        f"images: {r['num_examples']}",
        f"accuracy: {r['accuracy'] * 100:.1f}%",
        f"macro-F1: {r['macro_f1']:.4f}",
        "top-3 accuracy: - (the model has 2 classes)",
        f"loss: {r['loss']:.4f}",
        f"most confused (true -> predicted): {', '.join(pairs) or 'none'}",
    ]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images of the trained classes the model never saw (another seed)."""
    root = tmp_path_factory.mktemp("cli-eval") / "held-out"
    return make_image_folder(root, {"cat": 3, "dog": 4}, seed=77)


@pytest.fixture(scope="module")
def evaluated(cli: Cli, job: dict[str, Any], held_out: Path, job_server: JobServer) -> Run:
    run = cli("models", "evaluate", job["model_id"], str(held_out))
    assert run.rc == 0, f"{run.out}\n{run.err}\n{job_server.worker.log()[-4000:]}"
    return run


def test_evaluate_uploads_the_folder_waits_and_prints_the_apis_figures(
    evaluated: Run, job: dict[str, Any], held_out: Path, api: httpx.Client
) -> None:
    evaluation_id = evaluated.lines[0].split()[1]
    evaluation = api.get(f"/v1/evaluations/{evaluation_id}").json()
    result = evaluation["result"]
    assert (evaluation["status"], evaluation["model_id"]) == ("succeeded", job["model_id"])
    assert (result["num_examples"], result["skipped"], result["classes"]) == (7, 0, ["cat", "dog"])
    assert result["top_k_accuracy"] == {"1": result["accuracy"]}
    # stdout: the summary alone, every figure the API's.
    assert evaluated.lines == evaluation_lines(evaluation)
    # stderr: the upload (as `datasets upload` says it), then the evaluation's stages and counts.
    zipping, uploading, *middle = evaluated.err.splitlines()
    assert zipping == f"zipping {held_out}"
    assert re.fullmatch(r"uploading held-out\.zip \(\d+\.\d kB\)", uploading), uploading
    ready = f"dataset {evaluation['dataset_id']} ready: 7 images in 2 classes (held-out)"
    following = middle[middle.index(ready) + 1 :]
    assert following[0] == f"{evaluation_id}: queued"
    stage = r"(queued|running|scored \d+/(\d+|\?) images)"
    assert all(re.fullmatch(rf"{evaluation_id}: {stage}", line) for line in following), following
    assert "\r" not in evaluated.err


def test_evaluate_a_dataset_by_id_json_and_the_list(
    cli: Cli, evaluated: Run, job: dict[str, Any], api: httpx.Client
) -> None:
    model_id = job["model_id"]
    first = api.get(f"/v1/evaluations/{evaluated.lines[0].split()[1]}").json()
    run = cli("models", "evaluate", model_id, first["dataset_id"], "--json")
    assert run.rc == 0, run.err
    again = run.json()  # stdout: exactly the API's evaluation
    assert again == api.get(f"/v1/evaluations/{again['id']}").json()
    assert again["id"] != first["id"] and again["dataset_id"] == first["dataset_id"]
    # The same model on the same images: the same figures.
    for key in ("accuracy", "macro_f1", "confusion_matrix", "most_confused", "num_examples"):
        assert again["result"][key] == first["result"][key], key
    *progress, summary = run.err.splitlines()
    r = again["result"]
    assert summary == (
        f"evaluation {again['id']} succeeded: 7 images, accuracy {r['accuracy'] * 100:.1f}%, "
        f"macro-F1 {r['macro_f1']:.4f}, top-3 accuracy - (the model has 2 classes)"
    )
    assert progress[0] == f"{again['id']}: queued", progress

    listed = cli("models", "evaluations", model_id, "--json")
    items = api.get(f"/v1/models/{model_id}/evaluations").json()["items"]
    assert listed.rc == 0 and listed.json() == items
    assert [e["id"] for e in items[:2]] == [again["id"], first["id"]]  # newest first
    table = cli("models", "evaluations", model_id)
    assert table.lines[0].split() == [
        "ID", "SOURCE", "STATUS", "ACCURACY", "MACRO-F1", "IMAGES", "DATASET", "CREATED"
    ]  # fmt: skip
    rows = [line.split() for line in table.lines[1:]]
    assert [row[0] for row in rows] == [e["id"] for e in items]
    validation = items[-1]["result"]  # the fine-tune's own validation result comes last
    assert rows[-1][1:7] == [
        "validation",
        "succeeded",
        f"{validation['accuracy'] * 100:.1f}%",
        f"{validation['macro_f1']:.4f}",
        "4",
        "-",
    ]
    assert rows[0][1:7] == [
        "dataset",
        "succeeded",
        f"{r['accuracy'] * 100:.1f}%",
        f"{r['macro_f1']:.4f}",
        "7",
        first["dataset_id"],
    ]


def test_evaluate_no_wait_prints_the_queued_evaluation(
    cli: Cli, evaluated: Run, job: dict[str, Any], api: httpx.Client, job_server: JobServer
) -> None:
    model_id = job["model_id"]
    dataset_id = api.get(f"/v1/evaluations/{evaluated.lines[0].split()[1]}").json()["dataset_id"]
    run = cli("models", "evaluate", model_id, dataset_id, "--no-wait")
    assert run.rc == 0, run.err
    match = re.fullmatch(
        rf"evaluation ({EVAL_ID}) queued: model {model_id} on dataset {dataset_id} "
        rf"\(see it: bitserve models evaluations {model_id}\)",
        run.out.rstrip("\n"),
    )
    assert match, run.out
    assert run.err == ""
    server = job_server.server
    with BitserveClient(server.url, api_key=server.key) as client:
        done = client.wait_for_evaluation(match.group(1), timeout=120)  # before the model goes
    assert done["status"] == "succeeded"


def test_evaluate_on_unknown_labels_is_the_apis_422_on_one_line(
    cli: Cli, job: dict[str, Any], tmp_path: Path
) -> None:
    zoo = make_image_folder(tmp_path / "zoo", {"cat": 2, "yak": 2}, seed=5)
    run = cli("models", "evaluate", job["model_id"], str(zoo))
    assert (run.rc, run.out) == (1, "")
    assert run.err.splitlines()[-1] == (
        "bitserve: unknown_labels: the model does not know the labels: yak (it knows: cat, "
        "dog); evaluate on class folders named like its classes"
    )
    # Before it, the upload: the dataset itself was fine.
    assert re.fullmatch(
        r"dataset ds_[a-z2-7]{20} ready: 4 images in 2 classes \(zoo\)", run.err.splitlines()[-2]
    )


# -- batch predictions -------------------------------------------------------------------------

BP_ID = r"bp_[a-z2-7]{20}"
SIZE = r"(\d+ B|\d+\.\d kB)"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images to label (their folders are ignored by a batch prediction)."""
    return make_image_folder(
        tmp_path_factory.mktemp("cli-batch") / "photos", {"cat": 4, "dog": 3}, seed=91
    )


def _dataset_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


@pytest.fixture(scope="module")
def batch_run(
    cli: Cli,
    job: dict[str, Any],
    photos: Path,
    job_server: JobServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Run, Path]:
    here = tmp_path_factory.mktemp("cli-batch-cwd")
    run = cli("models", "batch-predict", job["model_id"], str(photos), "--top-k", "2", cwd=here)
    assert run.rc == 0, f"{run.out}\n{run.err}\n{job_server.worker.log()[-4000:]}"
    return run, here


def test_batch_predict_uploads_waits_and_downloads_the_apis_output(
    batch_run: tuple[Run, Path], job: dict[str, Any], photos: Path, api: httpx.Client
) -> None:
    run, here = batch_run
    match = re.fullmatch(
        rf"wrote ({BP_ID})\.csv: 7 rows \({SIZE}, batch prediction \1\)", run.out.rstrip("\n")
    )
    assert match, run.out
    batch_id = match.group(1)
    batch = api.get(f"/v1/batch-predictions/{batch_id}").json()
    output = api.get(f"/v1/batch-predictions/{batch_id}/output")
    assert output.status_code == 200
    assert (batch["status"], batch["model_id"], batch["top_k"], batch["format"]) == (
        "succeeded",
        job["model_id"],
        2,
        "csv",
    )
    # The file written in the current folder: the API's output, byte for byte, and nothing else.
    assert sorted(p.name for p in here.iterdir()) == [f"{batch_id}.csv"]
    assert (here / f"{batch_id}.csv").read_bytes() == output.content
    rows = list(csv.DictReader(io.StringIO(output.text)))
    assert [r["file"] for r in rows] == _dataset_files(photos)  # every file once, sorted
    assert len(rows) == batch["result"]["rows"] == 7 and batch["result"]["errors"] == 0
    assert all(r["label_1"] in ("cat", "dog") and r["error"] == "" for r in rows)
    assert batch["result"]["bytes"] == len(output.content)
    assert match.group(2) == render_size(len(output.content))
    # stderr: the upload, then the batch prediction's stages and counts (plain lines).
    zipping, uploading, *middle = run.err.splitlines()
    assert zipping == f"zipping {photos}"
    assert re.fullmatch(r"uploading photos\.zip \(\d+\.\d kB\)", uploading), uploading
    ready = f"dataset {batch['dataset_id']} ready: 7 images in 2 classes (photos)"
    following = middle[middle.index(ready) + 1 :]
    assert following[0] == f"{batch_id}: queued"
    stage = r"(queued|running|shard \d+/\d+, \d+/\d+ images)"
    assert all(re.fullmatch(rf"{batch_id}: {stage}", line) for line in following), following
    assert "\r" not in run.err


def render_size(count: int) -> str:
    return f"{count} B" if count < 1000 else f"{count / 1000:.1f} kB"


def test_batch_predict_a_dataset_by_id_as_jsonl_json_and_the_list(
    cli: Cli,
    batch_run: tuple[Run, Path],
    job: dict[str, Any],
    photos: Path,
    api: httpx.Client,
    tmp_path: Path,
) -> None:
    model_id = job["model_id"]
    first_id = batch_run[0].out.split()[1].removesuffix(".csv:")
    first = api.get(f"/v1/batch-predictions/{first_id}").json()
    target = tmp_path / "labels.jsonl"
    run = cli(
        "models", "batch-predict", model_id, first["dataset_id"], "--format", "jsonl",
        "--top-k", "1", "-o", str(target), "--json",
    )  # fmt: skip
    assert run.rc == 0, run.err
    answer = run.json()  # stdout: the API's batch prediction and the file written
    batch = api.get(f"/v1/batch-predictions/{answer['id']}").json()
    assert answer == {**batch, "path": str(target)}
    assert (batch["format"], batch["top_k"], batch["dataset_id"]) == (
        "jsonl",
        1,
        first["dataset_id"],
    )
    output = api.get(f"/v1/batch-predictions/{batch['id']}/output").content
    assert target.read_bytes() == output
    lines = [json.loads(line) for line in output.decode().splitlines()]
    assert [line["file"] for line in lines] == _dataset_files(photos)
    assert all(len(line["predictions"]) == 1 for line in lines)
    *progress, summary = run.err.splitlines()
    assert progress[0] == f"{batch['id']}: queued", progress
    assert summary == (
        f"wrote {target}: 7 rows ({render_size(len(output))}, batch prediction {batch['id']})"
    )

    listed = cli("models", "batch-predictions", model_id, "--json")
    items = api.get(f"/v1/models/{model_id}/batch-predictions").json()["items"]
    assert listed.rc == 0 and listed.json() == items
    assert [b["id"] for b in items[:2]] == [batch["id"], first_id]  # newest first
    table = cli("models", "batch-predictions", model_id)
    assert table.lines[0].split() == [
        "ID", "STATUS", "FORMAT", "TOP-K", "ROWS", "ERRORS", "DATASET", "CREATED"
    ]  # fmt: skip
    rows = [line.split() for line in table.lines[1:]]
    assert [row[0] for row in rows] == [b["id"] for b in items]
    assert rows[0][1:7] == ["succeeded", "jsonl", "1", "7", "0", first["dataset_id"]]
    assert rows[1][1:7] == ["succeeded", "csv", "2", "7", "0", first["dataset_id"]]


def test_batch_predict_no_wait_prints_the_queued_batch_prediction(
    cli: Cli,
    batch_run: tuple[Run, Path],
    job: dict[str, Any],
    api: httpx.Client,
    job_server: JobServer,
    tmp_path: Path,
) -> None:
    model_id = job["model_id"]
    first_id = batch_run[0].out.split()[1].removesuffix(".csv:")
    dataset_id = api.get(f"/v1/batch-predictions/{first_id}").json()["dataset_id"]
    run = cli("models", "batch-predict", model_id, dataset_id, "--no-wait", cwd=tmp_path)
    assert run.rc == 0, run.err
    match = re.fullmatch(
        rf"batch prediction ({BP_ID}) queued: model {model_id} on dataset {dataset_id}, top 5, "
        rf"csv \(see it: bitserve models batch-predictions {model_id}\)",
        run.out.rstrip("\n"),
    )
    assert match, run.out
    assert run.err == "" and list(tmp_path.iterdir()) == []  # nothing downloaded
    server = job_server.server
    with BitserveClient(server.url, api_key=server.key) as client:
        done = client.wait_for_batch_prediction(match.group(1), timeout=120)
    assert done["status"] == "succeeded"
