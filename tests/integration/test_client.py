"""bitserve_client against a REAL uvicorn server on PostgreSQL + Redis (tests/conftest.py).
What a healthy server never does (503 then 200, a cut event stream) is in
tests/unit/test_client_retries.py and tests/unit/test_client_waiting.py, against a scripted
loopback server.

Uploads are ingested by the session server's own ingest worker: upload_dataset waits for the
dataset to be ready (or raises DatasetFailed) unless told wait=False.

The full loop (upload -> job on a real Celery worker -> wait -> predict) uses tiny-R10x0.25 from
scratch with 12 steps at 32 px; its predictions are checked against bitcore's Predictor on the
downloaded artifact.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bitcore.predict import Predictor
from bitserve_client import (
    ApiError,
    BitserveClient,
    DatasetFailed,
    IngestProgressEvent,
    JobFailed,
    JobTimeout,
    Progress,
)
from tests.imagegen import class_image, encode, make_archive, make_image_folder
from tests.integration.conftest import JobServer, LiveServer
from tests.integration.worker_fixtures import FAST_OVERRIDES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def api(live_server_instance: LiveServer) -> Iterator[BitserveClient]:
    server = live_server_instance
    with BitserveClient(server.url, api_key=server.key, timeout=60) as client:
        yield client


# -- datasets, plan, base models, errors (the session's server) -----------------------------


def test_upload_a_folder_zips_it_and_reports_classes_and_rejected(
    api: BitserveClient, tmp_path: Path
) -> None:
    folder = make_image_folder(
        tmp_path / "pets", {"cat": 3, "dog": 4}, corrupt={"cat/broken.png": "text"}
    )
    (folder / ".DS_Store").write_bytes(b"finder metadata")  # hidden: never uploaded
    dataset = api.upload_dataset(folder)
    assert dataset["id"].startswith("ds_")
    assert dataset["name"] == "pets"  # from the zip's file name, pets.zip
    assert dataset["status"] == "ready"
    assert (dataset["num_images"], dataset["num_classes"]) == (7, 2)
    assert dataset["classes"] == [{"name": "cat", "count": 3}, {"name": "dog", "count": 4}]
    assert dataset["image_size"] == {"median_height": 40, "median_width": 48}
    assert dataset["rejected"] == [{"path": "cat/broken.png", "reason": "unsupported_format"}]
    assert (dataset["progress"], dataset["error"]) == (None, None)
    assert dataset["finished_at"] is not None
    assert api.get_dataset(dataset["id"]) == dataset
    assert not list(tmp_path.glob("*.zip"))  # the temp zip lived elsewhere and is gone


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_upload_an_archive_streams_it_as_is(api: BitserveClient, tmp_path: Path, kind: str) -> None:
    folder = make_image_folder(tmp_path / "shapes", {"a": 2, "b": 2, "c": 3}, top_level="top")
    archive = make_archive(folder, kind)
    dataset = api.upload_dataset(archive, name=f"shapes {kind}")
    assert dataset["name"] == f"shapes {kind}"
    assert dataset["bytes"] == archive.stat().st_size
    assert dataset["classes"] == [
        {"name": "a", "count": 2},
        {"name": "b", "count": 2},
        {"name": "c", "count": 3},
    ]
    assert dataset["rejected"] == []


def test_upload_without_waiting_then_follow_the_ingestion(
    api: BitserveClient, tmp_path: Path
) -> None:
    archive = make_archive(make_image_folder(tmp_path / "w", {"a": 3, "b": 2}))
    accepted = api.upload_dataset(archive, name="later", wait=False)
    assert (accepted["status"], accepted["name"], accepted["num_images"]) == (
        "processing",
        "later",
        0,
    )
    assert accepted["progress"] is not None and accepted["image_size"] is None
    progress: list[IngestProgressEvent] = []
    ready = api.wait_for_dataset(accepted["id"], timeout=90, on_progress=progress.append)
    assert (ready["id"], ready["status"], ready["num_images"], ready["progress"]) == (
        accepted["id"],
        "ready",
        5,
        None,
    )
    assert ready["classes"] == [{"name": "a", "count": 3}, {"name": "b", "count": 2}]
    # The phases it went through (those the stream saw) never go back.
    order = ["queued", "extracting", "indexing", "storing", "done"]
    ranks = [order.index(p["phase"]) for p in progress]
    assert ranks == sorted(ranks), progress
    assert all(p["id"] == accepted["id"] for p in progress)
    # Watching an ended dataset: its status, then done.
    events = list(api.watch_dataset(accepted["id"], timeout=10))
    assert [(e.event, e.data["status"]) for e in events] == [("status", "ready"), ("done", "ready")]


def test_list_iterates_every_page_and_delete_removes(api: BitserveClient, tmp_path: Path) -> None:
    archive = make_archive(make_image_folder(tmp_path / "d", {"x": 2, "y": 2}))
    ids = [api.upload_dataset(archive, name=f"page {i}")["id"] for i in range(3)]
    listed = [d["id"] for d in api.list_datasets(page_size=1)]
    assert len(listed) == len(set(listed))  # no page repeats an item
    assert [i for i in listed if i in ids] == ids[::-1]  # newest first, all three
    assert listed == [d["id"] for d in api.list_datasets()]  # same list with big pages

    api.delete_dataset(ids[0])
    with pytest.raises(ApiError) as caught:
        api.get_dataset(ids[0])
    assert (caught.value.status, caught.value.code) == (404, "not_found")
    assert ids[0] not in [d["id"] for d in api.list_datasets()]


def test_plan_passes_overrides_and_base_models_lists_the_registry(
    api: BitserveClient, tmp_path: Path
) -> None:
    dataset = api.upload_dataset(make_image_folder(tmp_path / "p", {"a": 5, "b": 5}))
    result = api.plan(dataset["id"], "tiny-R10x0.25", steps=7, batch_size=4, crop=32, precrop=40)
    plan = result["plan"]
    assert (plan["total_steps"], plan["batch_size"], plan["crop"], plan["precrop"]) == (
        7,
        4,
        32,
        40,
    )
    assert sorted(plan["source"]["overridden"]) == ["batch_size", "crop", "precrop", "steps"]
    assert result["estimate"]["images_processed"] == 28
    # 10 images, validation 0.1 -> 1 held out per class at most; the default rule otherwise.
    default = api.plan(dataset["id"], "tiny-R10x0.25", validation_fraction=0.5)["plan"]
    assert default["source"]["overridden"] == []
    assert result["estimate"]["training_examples"] > default["source"]["num_examples"]

    models = {m["name"]: m for m in api.base_models()}
    assert models["tiny-R10x0.25"]["requires_checkpoint"] is False
    assert models["BiT-M-R50x1"]["requires_checkpoint"] is True


def test_errors_carry_the_servers_code_message_and_details(
    api: BitserveClient, tmp_path: Path
) -> None:
    with pytest.raises(ApiError) as caught:
        api.get_dataset("ds_doesnotexist")
    assert (caught.value.status, caught.value.code) == (404, "not_found")
    assert "ds_doesnotexist" in caught.value.message

    text = tmp_path / "notes.zip"
    text.write_text("not an archive at all\n" * 10)
    with pytest.raises(ApiError) as caught:
        api.upload_dataset(text)
    assert (caught.value.status, caught.value.code) == (415, "unsupported_media_type")

    # Found by the ingest worker now: the failed dataset's error, raised as the ApiError the
    # synchronous upload used to answer (same status, code and details).
    one_class = make_archive(make_image_folder(tmp_path / "one", {"solo": 3}))
    with pytest.raises(ApiError) as caught:
        api.upload_dataset(one_class)
    assert isinstance(caught.value, DatasetFailed)
    assert (caught.value.status, caught.value.code) == (422, "too_few_classes")
    assert caught.value.details["classes"] == [{"name": "solo", "count": 3}]
    failed = api.get_dataset(caught.value.dataset_id)
    assert (failed["status"], failed["error"], failed["num_images"]) == (
        "failed",
        {
            "code": "too_few_classes",
            "message": caught.value.message,
            "details": caught.value.details,
        },
        0,
    )
    with pytest.raises(DatasetFailed) as again:  # an ended dataset: raised at once
        api.wait_for_dataset(failed["id"], timeout=5)
    assert again.value.dataset == failed

    dataset = api.upload_dataset(make_image_folder(tmp_path / "ok", {"a": 2, "b": 2}))
    with pytest.raises(ApiError) as caught:
        api.plan(dataset["id"], "ResNet-9000")
    assert (caught.value.status, caught.value.code) == (422, "unknown_base_model")
    assert caught.value.details["field"] == "base_model"

    with pytest.raises(FileNotFoundError):
        api.upload_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        api.upload_dataset(tmp_path / "empty")


def test_jobs_are_idempotent_and_a_cancelled_job_raises_job_failed(
    api: BitserveClient, tmp_path: Path
) -> None:
    # No worker listens on this server's queue: the job stays queued until cancelled.
    dataset = api.upload_dataset(make_image_folder(tmp_path / "j", {"a": 2, "b": 2}))
    overrides = {"steps": 5, "batch_size": 2}
    job = api.create_job(dataset["id"], "tiny-R10x0.25", overrides, idempotency_key="k-1")
    assert (job["status"], job["plan"]["total_steps"]) == ("queued", 5)
    again = api.create_job(dataset["id"], "tiny-R10x0.25", overrides, idempotency_key="k-1")
    assert again["id"] == job["id"]
    with pytest.raises(ApiError) as caught:
        api.create_job(dataset["id"], "tiny-R10x0.25", {"steps": 6}, idempotency_key="k-1")
    assert caught.value.status == 409
    other = api.create_job(dataset["id"], "tiny-R10x0.25", overrides)  # a fresh key
    assert other["id"] != job["id"]
    assert {job["id"], other["id"]} <= {j["id"] for j in api.list_jobs(status="queued")}

    with pytest.raises(JobTimeout) as timed_out:
        api.wait_for_job(job["id"], timeout=0.3)
    assert timed_out.value.job_id == job["id"]

    assert api.cancel_job(job["id"])["status"] == "cancelled"
    with pytest.raises(JobFailed) as failed:
        api.wait_for_job(job["id"], timeout=10)
    assert (failed.value.status, failed.value.job_id) == ("cancelled", job["id"])
    events = list(api.watch_job(job["id"], timeout=10))
    assert [e.event for e in events] == ["status", "done"]
    assert events[-1].data["status"] == "cancelled"
    api.cancel_job(other["id"])


# -- the whole loop, with a real Celery worker ------------------------------------------------


def test_full_loop_create_wait_predict_download(job_server: JobServer, tmp_path: Path) -> None:
    with BitserveClient(job_server.server.url, api_key=job_server.server.key) as api:
        folder = make_image_folder(tmp_path / "pets", {"cat": 4, "dog": 4})
        dataset = api.upload_dataset(folder)
        job = api.create_job(
            dataset["id"], "tiny-R10x0.25", FAST_OVERRIDES, validation_fraction=0.25, name="t"
        )
        progress: list[Progress] = []
        try:
            done = api.wait_for_job(job["id"], timeout=120, on_progress=progress.append)
        except (JobFailed, JobTimeout):
            print(job_server.worker.log()[-4000:])
            raise
        assert (done["status"], done["id"], done["name"]) == ("succeeded", job["id"], "t")
        steps = [p["step"] for p in progress]
        assert steps and steps == sorted(steps) and steps[-1] == FAST_OVERRIDES["steps"]
        assert all(p["total_steps"] == FAST_OVERRIDES["steps"] for p in progress)

        model_id = done["model_id"]
        assert model_id is not None
        model = api.get_model(model_id)
        assert (model["job_id"], model["classes"]) == (job["id"], ["cat", "dog"])
        assert model_id in [m["id"] for m in api.list_models()]

        # Paths, bytes and a PIL image, in that order; top_k=5 is clamped to the 2 classes.
        pil = class_image(1, 2, (40, 48), seed=77)
        first = tmp_path / "first.png"
        first.write_bytes(encode(class_image(0, 2, (40, 48), seed=76)))
        raw = encode(class_image(0, 2, (44, 44), seed=78), "JPEG")
        ranked = api.predict(model_id, [first, raw, pil], top_k=5)
        assert len(ranked) == 3 and all(len(r) == 2 for r in ranked)

        # The same answers from bitcore on the downloaded artifact.
        archive = api.download_artifact(model_id, tmp_path)
        assert archive == tmp_path / f"{model_id}.zip"
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp_path / "artifact")
        predictor = Predictor.load(tmp_path / "artifact", device="cpu")
        expected = predictor.predict([first.read_bytes(), raw, encode(pil)], top_k=2)
        for got, want in zip(ranked, expected, strict=True):
            assert [g["label"] for g in got] == [label for label, _ in want]
            assert [g["score"] for g in got] == pytest.approx([s for _, s in want], abs=1e-5)
            assert sum(g["score"] for g in got) == pytest.approx(1.0, abs=1e-5)

        # The ONNX export: its own file name, a graph with the model's classes.
        onnx_file = api.download_artifact(model_id, tmp_path, format="onnx")
        assert onnx_file == tmp_path / f"{model_id}.onnx"
        import onnx

        props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
        assert props["model_name"] == "tiny-R10x0.25" and props["output.name"] == "logits"
        with pytest.raises(ValueError, match="format must be"):
            api.download_artifact(model_id, tmp_path, format="pt")

        api.delete_model(model_id)
        with pytest.raises(ApiError) as caught:
            api.get_model(model_id)
        assert caught.value.code == "not_found"


def test_an_int8_job_records_its_guard_and_serves_what_it_decided(
    job_server: JobServer, tmp_path: Path
) -> None:
    """serving_precision="int8" end to end: the worker runs the guard on the validation split,
    the model's metrics say what it measured, the gateway serves the int8 graph, and the
    downloaded artifact (which carries it) gives the same answers through bitcore."""
    with BitserveClient(job_server.server.url, api_key=job_server.server.key) as api:
        folder = make_image_folder(tmp_path / "colours", {"a": 8, "b": 8, "c": 8})
        dataset = api.upload_dataset(folder)
        job = api.create_job(
            dataset["id"],
            "tiny-R10x0.25",
            {**FAST_OVERRIDES, "steps": 20, "batch_size": 8},
            validation_fraction=0.25,
            serving_precision="int8",
        )
        assert job["serving_precision"] == "int8"
        done = api.wait_for_job(job["id"], timeout=150)
        assert done["status"] == "succeeded", job_server.worker.log()[-4000:]
        assert done["model_id"] is not None
        model = api.get_model(done["model_id"])
        check = model["metrics"]["precision"]
        assert check is not None
        # 2 of each class's 8 held out, the other 18 calibrate
        assert (check["requested"], check["validation_images"], check["calibration_images"]) == (
            "int8",
            6,
            18,
        )
        assert check["agreement"] == check["agreeing"] / 6
        assert check["served"] == ("int8" if check["agreeing"] == 6 else "fp32")
        print(f"int8 guard: {check['reason']}")

        images = [encode(class_image(i % 3, 3, (40, 48), seed=300 + i)) for i in range(6)]
        ranked = api.predict(model["id"], images, top_k=3)
        archive = api.download_artifact(model["id"], tmp_path)
        with zipfile.ZipFile(archive) as zf:
            names = sorted(zf.namelist())
            zf.extractall(tmp_path / "artifact")
        served_int8 = check["served"] == "int8"
        expected_names = ["metadata.json", "model.safetensors"]
        assert names == sorted(
            [*expected_names, "model.int8.onnx"] if served_int8 else expected_names
        )
        predictor = Predictor.load(tmp_path / "artifact", runtime="onnxruntime")
        assert predictor.precision == check["served"]
        expected = predictor.predict(images, top_k=3)
        for got, want in zip(ranked, expected, strict=True):
            assert [g["label"] for g in got] == [label for label, _ in want]
            assert [g["score"] for g in got] == pytest.approx([s for _, s in want], abs=1e-5)
        # the job shows the same record
        job_metrics = api.get_job(job["id"])["metrics"]
        assert job_metrics is not None and job_metrics["precision"] == check
