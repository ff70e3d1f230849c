"""`bitserve datasets|jobs|models|predict` as a user runs them: the `bitserve` entry point
(`python -m service.cli`, which hands these commands to bitserve_client.cli) in a real
subprocess, against a REAL uvicorn server and Celery worker on PostgreSQL + Redis
(tests/integration/conftest.py `job_server`; the fixtures: cli_remote/conftest.py), connected
through BITSERVE_URL and BITSERVE_API_KEY. Output is captured, so stdout is no terminal:
progress comes as plain lines.

The module follows one dataset through: upload (waits for ingestion), a job with --watch
(tiny-R10x0.25 from scratch, 12 steps at 32 px), then reads, predictions and exports compared
with what the API itself answers, errors, and finally cancel and delete. Evaluations and
batch predictions of a model: test_evaluations_batches.py.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest

from bitserve_client.schema import Phase
from tests.imagegen import class_image, encode, make_image_folder
from tests.integration.cli_helpers import FAST, REPO_ROOT, Cli, Run, cli_env, run_cli
from tests.integration.conftest import JobServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

STAGES = ("queued", *get_args(Phase))  # a job's stages, in the order it goes through them


# -- datasets ----------------------------------------------------------------------------------


def test_upload_zips_the_folder_waits_and_ends_with_the_ready_dataset(
    uploaded: Run, dataset_id: str, api: httpx.Client, images: Path
) -> None:
    dataset = api.get(f"/v1/datasets/{dataset_id}").json()
    assert (dataset["status"], dataset["name"], dataset["num_images"]) == ("ready", "pets", 12)
    zipping, uploading, *middle, last = uploaded.lines
    assert zipping == f"zipping {images}"
    assert re.fullmatch(r"uploading pets\.zip \(\d+\.\d kB\)", uploading), uploading
    assert last == f"dataset {dataset_id} ready: 12 images in 2 classes (pets)"
    # Between them, plain lines only (stdout is a pipe): the ingestion's phases as they came.
    phase = r"(queued|extracting|indexing|storing|done)( \d+/(\d+|\?))?"
    assert all(re.fullmatch(rf"{dataset_id}: {phase}", line) for line in middle), middle
    assert "\r" not in uploaded.out and uploaded.err == ""


def test_upload_json_no_wait_prints_only_the_processing_dataset(
    cli: Cli, images: Path, api: httpx.Client
) -> None:
    run = cli("datasets", "upload", str(images), "--name", "later", "--no-wait", "--json")
    assert run.rc == 0, run.err
    dataset = run.json()  # stdout is exactly one JSON document
    assert (dataset["status"], dataset["name"]) == ("processing", "later")
    assert run.err.splitlines() == [
        f"zipping {images}",
        "uploading pets.zip (" + run.err.split("(", 1)[1].split(")", 1)[0] + ")",
        f"dataset {dataset['id']} processing (follow it: bitserve datasets show {dataset['id']})",
    ]
    assert api.get(f"/v1/datasets/{dataset['id']}").status_code == 200


def test_a_refused_dataset_is_one_error_line_and_exit_1(cli: Cli, tmp_path: Path) -> None:
    one_class = make_image_folder(tmp_path / "solo", {"only": 3})
    run = cli("datasets", "upload", str(one_class), "--json")
    assert run.rc == 1
    failed = run.json()  # --json: the failed dataset, as the API shows it
    assert (failed["status"], failed["error"]["code"]) == ("failed", "too_few_classes")
    assert run.err.splitlines()[-1] == (
        f"bitserve: too_few_classes: {failed['error']['message']} (dataset {failed['id']} failed)"
    )


def test_datasets_list_and_show_json_are_the_apis(
    cli: Cli, dataset_id: str, api: httpx.Client
) -> None:
    shown = cli("datasets", "show", dataset_id, "--json")
    assert shown.rc == 0 and shown.json() == api.get(f"/v1/datasets/{dataset_id}").json()
    listed = cli("datasets", "list", "--limit", "3", "--json")
    assert listed.rc == 0
    assert listed.json() == api.get("/v1/datasets", params={"limit": 3}).json()["items"]
    table = cli("datasets", "list", "--limit", "0")
    row = next(line for line in table.lines if line.startswith(dataset_id))
    assert row.split()[1:5] == ["pets", "ready", "12", "2"]
    details = cli("datasets", "show", dataset_id)
    assert "classes      cat (6), dog (6)" in details.lines


# -- jobs ----------------------------------------------------------------------------------------


def test_watch_ends_with_one_summary_line(watched: Run, job: dict[str, Any]) -> None:
    progress, metrics = job["progress"], job["metrics"]
    assert (job["status"], job["name"], progress["step"]) == ("succeeded", "cli-job", 12)
    summary = (
        f"job {job['id']} succeeded: 12/12 steps, final loss {progress['loss']:.4f}, "
        f"accuracy {metrics['accuracy'] * 100:.1f}%, model {job['model_id']}"
    )
    assert watched.lines[-1] == summary
    assert sum(line.startswith(f"job {job['id']} ") for line in watched.lines) == 1
    # Before it: a line per stage change, progress lines, no carriage returns (not a terminal).
    # The event stream reports the job as it stands at each poll, so a stage shorter than the
    # poll interval (12 steps of training on a fast machine) may not be seen: the stages shown
    # are each once, in the job's order, from queued to done.
    stages = [line.split(": ", 1)[1] for line in watched.lines[:-1] if "step " not in line]
    assert stages[0] == "queued" and stages[-1] == "done", watched.out
    assert stages == [stage for stage in STAGES if stage in stages], watched.out
    steps = [
        int(m.group(1)) for line in watched.lines if (m := re.search(r": step (\d+)/12", line))
    ]
    # At most one every 5 s (tests/unit/test_cli_follow.py times that exactly): a few, rising.
    assert steps == sorted(set(steps)) and len(steps) < 12
    assert "\r" not in watched.out and watched.err == ""


def test_jobs_list_and_show_json_are_the_apis(
    cli: Cli, job: dict[str, Any], api: httpx.Client
) -> None:
    shown = cli("jobs", "show", job["id"], "--json")
    assert shown.rc == 0 and shown.json() == job
    listed = cli("jobs", "list", "--status", "succeeded", "--limit", "2", "--json")
    expected = api.get("/v1/jobs", params={"status": "succeeded", "limit": 2}).json()["items"]
    assert listed.rc == 0 and listed.json() == expected
    table = cli("jobs", "list", "--status", "succeeded")
    row = next(line for line in table.lines if line.startswith(job["id"]))
    assert row.split()[1:5] == ["cli-job", "succeeded", "tiny-R10x0.25", "12/12"]
    assert job["model_id"] in row


def test_watching_an_ended_job_prints_its_summary_again(
    cli: Cli, job: dict[str, Any], watched: Run
) -> None:
    run = cli("jobs", "watch", job["id"])
    assert (run.rc, run.lines) == (0, [watched.lines[-1]])
    # --json: the finished job alone on stdout, the summary for people on stderr.
    run = cli("jobs", "watch", job["id"], "--json")
    assert (run.rc, run.json(), run.err) == (0, job, watched.lines[-1] + "\n")


def test_bad_overrides(cli: Cli, dataset_id: str) -> None:
    base = ["jobs", "create", "--dataset", dataset_id, "--base-model", "tiny-R10x0.25"]
    malformed = cli(*base, "--set", "steps")  # click's usage error: exit 2, no request sent
    assert malformed.rc == 2 and malformed.out == ""
    assert "Invalid value for '--set': expected KEY=VALUE, got 'steps'" in malformed.err
    not_a_number = cli(*base, "--set", "steps=many")
    assert not_a_number.rc == 2
    assert "the value of steps must be a number, got 'many'" in not_a_number.err
    unknown = cli(*base, "--set", "warp=9")  # the API's 422, one line
    assert (unknown.rc, unknown.out) == (1, "")
    assert re.fullmatch(r"bitserve: invalid_request: .*\n", unknown.err), unknown.err
    assert "warp" in unknown.err
    clash = cli(*base, "--set", "crop=64", "--set", "precrop=32")
    assert clash.rc == 1 and clash.err.startswith("bitserve: invalid_override: ")


# -- models and predict ------------------------------------------------------------------------


def test_models_list_and_show(cli: Cli, job: dict[str, Any], api: httpx.Client) -> None:
    model = api.get(f"/v1/models/{job['model_id']}").json()
    shown = cli("models", "show", model["id"], "--json")
    assert shown.rc == 0 and shown.json() == model
    listed = cli("models", "list", "--limit", "1", "--json")
    assert listed.json() == api.get("/v1/models", params={"limit": 1}).json()["items"]
    details = cli("models", "show", model["id"])
    assert "classes          cat, dog" in details.lines
    assert f"accuracy         {model['metrics']['accuracy'] * 100:.1f}%" in details.lines
    per_class = [line.split() for line in details.lines if line.startswith(("cat ", "dog "))]
    assert [(row[0], int(row[4])) for row in per_class] == [("cat", 2), ("dog", 2)]


def test_predict_prints_what_the_api_answers(
    cli: Cli, job: dict[str, Any], api: httpx.Client, tmp_path: Path
) -> None:
    model_id = job["model_id"]
    files = []
    for i, name in enumerate(["cat", "dog", "cat"]):
        path = tmp_path / f"{name}_{i}.png"
        path.write_bytes(encode(class_image(["cat", "dog"].index(name), 2, (40, 48), seed=900 + i)))
        files.append(path)

    def api_predict(top_k: int) -> Any:
        parts = [("files", (p.name, p.read_bytes(), "image/png")) for p in files]
        return api.post(f"/v1/models/{model_id}/predict", params={"top_k": top_k}, files=parts)

    answer = api_predict(1).json()
    run = cli("predict", model_id, *map(str, files))
    assert run.rc == 0, run.err
    assert run.lines[0].split() == ["FILE", "LABEL", "SCORE"]
    expected = [
        [str(path), p["top_k"][0]["label"], f"{p['top_k'][0]['score']:.4f}"]
        for path, p in zip(files, answer["predictions"], strict=True)
    ]
    assert [line.split() for line in run.lines[1:]] == expected
    # The model learned the generated classes (validation accuracy above): each new image of
    # a class gets that class.
    assert [row[1] for row in expected] == ["cat", "dog", "cat"]

    two = cli("predict", model_id, *map(str, files), "--top-k", "2", "--json")
    assert two.rc == 0 and two.json() == api_predict(2).json()


def test_export_writes_the_apis_download(
    cli: Cli, job: dict[str, Any], api: httpx.Client, tmp_path: Path
) -> None:
    model_id = job["model_id"]
    archive = api.get(f"/v1/models/{model_id}/artifact").content
    run = cli("models", "export", model_id, "-o", str(tmp_path))
    assert run.rc == 0, run.err
    written = tmp_path / f"{model_id}.zip"
    assert written.read_bytes() == archive
    assert run.lines == [f"wrote {written} ({run.out.rsplit('(', 1)[1]}".rstrip("\n")]

    weights = tmp_path / "weights.safetensors"
    run = cli("models", "export", model_id, "--format", "safetensors", "-o", str(weights), "--json")
    assert run.json() == {
        "model_id": model_id,
        "format": "safetensors",
        "path": str(weights),
        "bytes": weights.stat().st_size,
    }
    with zipfile.ZipFile(written) as zf:
        assert weights.read_bytes() == zf.read("model.safetensors")

    run = cli("models", "export", model_id, "--format", "onnx", "-o", str(tmp_path))
    assert run.rc == 0, run.err
    onnx = api.get(f"/v1/models/{model_id}/artifact", params={"format": "onnx"}).content
    assert (tmp_path / f"{model_id}.onnx").read_bytes() == onnx
    assert not [p.name for p in tmp_path.iterdir() if "part" in p.name or p.is_dir()]


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["jobs", "show", "job_aaaaaaaaaaaaaaaaaaaa"],
        ["datasets", "show", "ds_nope"],
        ["models", "export", "mdl_nope"],
        ["predict", "mdl_nope", __file__],
        ["models", "evaluate", "mdl_nope", "ds_nope"],
        ["models", "evaluations", "mdl_nope"],
        ["models", "batch-predict", "mdl_nope", "ds_nope"],
        ["models", "batch-predictions", "mdl_nope"],
    ],
)
def test_an_unknown_id_is_the_apis_not_found_on_one_line(
    cli: Cli, args: list[str], tmp_path: Path
) -> None:
    run = cli(*args, cwd=tmp_path)  # models export writes to the current folder
    assert (run.rc, run.out) == (1, "")
    assert re.fullmatch(r"bitserve: not_found: [^\n]+\n", run.err), run.err
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_key_says_where_keys_come_from(cli: Cli) -> None:
    run = cli("jobs", "list", key="bsk_wrong")
    assert run.rc == 1
    assert run.err.startswith("bitserve: invalid_api_key: ")
    assert run.err.endswith(
        " (set BITSERVE_API_KEY or --api-key; `bitserve up` writes .bitserve/admin.key)\n"
    )


def test_the_admin_key_file_is_read_without_a_key_in_the_environment(
    job_server: JobServer, tmp_path: Path
) -> None:
    (tmp_path / "admin.key").write_text(job_server.server.key + "\n")
    run = run_cli(job_server.server.url, None, "models", "list", "--json", home=tmp_path)
    assert run.rc == 0, run.err
    assert isinstance(run.json(), list)


def test_a_stopped_service_is_one_line_without_a_traceback(cli: Cli, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    line = (
        f"bitserve: the bitserve server at {url} is not answering; start it with `bitserve up` "
        "(or `docker compose up`), or point BITSERVE_URL / --url at a running one"
    )
    run = cli("jobs", "list", url=url)
    assert (run.rc, run.out, run.err) == (1, "", line + "\n")
    archive = tmp_path / "photos.zip"
    archive.write_bytes(b"x" * 2500)
    run = cli("datasets", "upload", str(archive), "--json", url=url)
    assert (run.rc, run.out) == (1, "")
    assert run.err.splitlines() == ["uploading photos.zip (2.5 kB)", line]


# -- cancel and delete (last: they remove what the tests above read) --------------------------


def test_cancel_then_delete(
    cli: Cli, dataset_id: str, job: dict[str, Any], job_server: JobServer, home: Path
) -> None:
    created = cli(
        "jobs", "create", "--dataset", dataset_id, "--base-model", "tiny-R10x0.25",
        *FAST, "--set", "steps=5000", "--json",
    )  # fmt: skip
    assert created.rc == 0, created.err
    new = created.json()
    assert new["status"] == "queued"
    # Ctrl-C while watching stops the watching, not the job: exit status 130.
    watching = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "jobs", "watch", new["id"]],
        cwd=REPO_ROOT,
        env=cli_env(job_server.server.url, job_server.server.key, home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watching.stdout is not None
    first = watching.stdout.readline()  # the job's first stage: the stream is open
    watching.send_signal(signal.SIGINT)
    rest, err = watching.communicate(timeout=30)
    assert (watching.returncode, err) == (130, "")
    assert re.fullmatch(rf"{new['id']}: (queued|preparing|training)\n", first), first
    assert rest.splitlines()[-1] == (
        f"stopped watching; job {new['id']} goes on (bitserve jobs watch {new['id']}, "
        f"bitserve jobs cancel {new['id']})"
    )
    cancelled = cli("jobs", "cancel", new["id"])
    assert cancelled.rc == 0
    assert cancelled.lines[0] in (f"job {new['id']} cancelled", f"job {new['id']} cancelling")
    watched = cli("jobs", "watch", new["id"])  # follows it to its end: cancelled, exit 1
    assert watched.rc == 1
    assert re.fullmatch(
        rf"job {new['id']} cancelled: \d+/5000 steps(, final loss \d\.\d{{4}})?",
        watched.lines[-1],
    ), watched.out
    again = cli("jobs", "cancel", new["id"])
    assert again.rc == 1 and again.err.startswith("bitserve: job_finished: ")

    assert cli("models", "delete", job["model_id"]).lines == [f"deleted {job['model_id']}"]
    gone = cli("models", "show", job["model_id"])
    assert gone.rc == 1 and gone.err.startswith("bitserve: not_found: ")
    deleted = cli("datasets", "delete", dataset_id, "--json")
    assert deleted.json() == {"id": dataset_id, "deleted": True}
