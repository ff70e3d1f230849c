"""Evaluations over real HTTP with a real worker (issue 15): a model's validation result is its
first evaluation; scoring it on a second labelled dataset gives the numbers scikit-learn gives
on the predictions the API answers for the same files; labels the model does not know are a
clear 422; a dataset still being ingested is waited for; thumbnails of the worst examples."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as sk

from bitserve_client import ApiError, BitserveClient
from bitserve_client.errors import EvaluationFailed
from bitserve_client.files import zip_folder
from tests.imagegen import make_image_folder
from tests.integration.conftest import JobServer
from tests.integration.worker_fixtures import FAST_OVERRIDES

pytestmark = pytest.mark.integration

CLASSES = ["ant", "bee", "cow"]
TIMEOUT = 120


@pytest.fixture(scope="module")
def trained(job_server: JobServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("evaluations")
    with BitserveClient(job_server.server.url, api_key=job_server.server.key) as api:
        folder = make_image_folder(tmp / "train", dict.fromkeys(CLASSES, 6), seed=1)
        dataset = api.upload_dataset(folder)
        job = api.create_job(
            dataset["id"], "tiny-R10x0.25", FAST_OVERRIDES, validation_fraction=0.25
        )
        done = api.wait_for_job(job["id"], timeout=TIMEOUT)
        model = api.get_model(done["model_id"] or "")
    return {"model": model, "tmp": tmp}


def _api(job_server: JobServer) -> BitserveClient:
    return BitserveClient(job_server.server.url, api_key=job_server.server.key)


def test_the_validation_result_is_the_first_evaluation(
    job_server: JobServer, trained: dict[str, Any]
) -> None:
    model = trained["model"]
    with _api(job_server) as api:
        (first,) = list(api.list_evaluations(model["id"]))
    assert (first["source"], first["status"], first["dataset_id"]) == (
        "validation",
        "succeeded",
        None,
    )
    result = first["result"]
    assert result is not None
    assert result["accuracy"] == model["metrics"]["accuracy"]
    assert result["confusion_matrix"] == model["metrics"]["confusion_matrix"]
    assert result["num_examples"] == 6  # 25% of 3 x 6 images: 2 per class
    assert result["classes"] == CLASSES and result["top_k_accuracy"] is None


# The API's scores are float32 probabilities rounded to JSON: each row sums to 1 within 1e-6,
# not within the float64 tolerance scikit-learn's log_loss checks.
@pytest.mark.filterwarnings("ignore:The y_prob values do not sum to one")
def test_an_evaluation_equals_scikit_learn_on_the_served_predictions(
    job_server: JobServer, trained: dict[str, Any]
) -> None:
    model, tmp = trained["model"], trained["tmp"]
    counts = {"ant": 4, "bee": 3, "cow": 5}
    folder = make_image_folder(tmp / "holdout", counts, seed=9)
    with _api(job_server) as api:
        dataset = api.upload_dataset(folder)
        queued = api.evaluate_model(model["id"], dataset["id"])
        assert (queued["status"], queued["source"], queued["dataset_id"]) == (
            "queued",
            "dataset",
            dataset["id"],
        )
        try:
            done = api.wait_for_evaluation(queued["id"], timeout=TIMEOUT)
        except Exception:
            print(job_server.worker.log()[-4000:])
            raise
        files = sorted(folder.rglob("*.png"))
        answers = api.predict(model["id"], files, top_k=len(CLASSES))
        assert next(e["id"] for e in api.list_evaluations(model["id"])) == queued["id"]

        # What the API answers for the same files, scored by scikit-learn.
        truth = np.array([CLASSES.index(f.parent.name) for f in files])
        probs = np.array(
            [[{a["label"]: a["score"] for a in answer}[c] for c in CLASSES] for answer in answers]
        )
        predicted = probs.argmax(1)
        labels = list(range(len(CLASSES)))
        result = done["result"]
        assert result is not None
        assert result["num_examples"] == 12 and result["skipped"] == 0
        assert (
            result["confusion_matrix"]
            == sk.confusion_matrix(truth, predicted, labels=labels).tolist()
        )
        assert result["accuracy"] == pytest.approx(sk.accuracy_score(truth, predicted), abs=1e-12)
        assert result["macro_f1"] == pytest.approx(
            sk.f1_score(truth, predicted, average="macro", zero_division=0), abs=1e-9
        )
        precision, recall, f1, support = sk.precision_recall_fscore_support(
            truth, predicted, labels=labels, zero_division=0
        )
        assert [c["label"] for c in result["per_class"]] == CLASSES
        assert [c["support"] for c in result["per_class"]] == support.tolist() == [4, 3, 5]
        for row, p, r, f in zip(result["per_class"], precision, recall, f1, strict=True):
            assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(
                (p, r, f), abs=1e-9
            )
        top_k = result["top_k_accuracy"]
        assert top_k is not None and sorted(top_k) == ["1", "3"]
        assert top_k["1"] == result["accuracy"] and top_k["3"] == 1.0
        assert result["loss"] == pytest.approx(sk.log_loss(truth, probs, labels=labels), rel=1e-4)
        off_diagonal = sum(
            n
            for t, row in enumerate(result["confusion_matrix"])
            for p, n in enumerate(row)
            if t != p
        )
        assert sum(pair["count"] for pair in result["most_confused"]) == off_diagonal

        # The worst examples: lowest probability for the true label first, thumbnails served.
        worst = result["worst"]
        assert len(worst) == 12
        true_scores = {
            f.relative_to(folder).as_posix(): probs[i, truth[i]] for i, f in enumerate(files)
        }
        assert [w["path"] for w in worst] == sorted(true_scores, key=lambda p: (true_scores[p], p))
        for example in worst[:3]:
            assert example["label_score"] == pytest.approx(true_scores[example["path"]], abs=1e-5)
        jpeg = api.example_thumbnail(done["id"], 0)
        with Image.open(io.BytesIO(jpeg)) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= 128
        with pytest.raises(ApiError) as past:
            api.example_thumbnail(done["id"], 12)
        assert past.value.status == 404


def test_unknown_labels_are_refused_naming_them(
    job_server: JobServer, trained: dict[str, Any]
) -> None:
    model, tmp = trained["model"], trained["tmp"]
    folder = make_image_folder(tmp / "zoo", {"ant": 2, "yak": 2, "zebra": 2}, seed=3)
    with _api(job_server) as api:
        dataset = api.upload_dataset(folder)
        with pytest.raises(ApiError) as refused:
            api.evaluate_model(model["id"], dataset["id"])
        with pytest.raises(ApiError) as missing:
            api.evaluate_model("mdl_" + "a" * 20, dataset["id"])
    assert (refused.value.status, refused.value.code) == (422, "unknown_labels")
    assert refused.value.details == {"labels": ["yak", "zebra"], "model_classes": CLASSES}
    assert "yak, zebra" in refused.value.message
    assert (missing.value.status, missing.value.code) == (404, "not_found")


def test_a_dataset_still_processing_is_waited_for(
    job_server: JobServer, trained: dict[str, Any]
) -> None:
    model, tmp = trained["model"], trained["tmp"]
    folder = make_image_folder(tmp / "later", {"ant": 2, "cow": 2}, seed=5)
    with _api(job_server) as api:
        dataset = api.upload_dataset(folder, wait=False)
        evaluation = api.evaluate_model(model["id"], dataset["id"])
        done = api.wait_for_evaluation(evaluation["id"], timeout=TIMEOUT)
        assert api.get_dataset(dataset["id"])["status"] == "ready"
        result = done["result"]
        assert result is not None and result["num_examples"] == 4
        assert result["labels_evaluated"] == ["ant", "cow"]
        assert [c["support"] for c in result["per_class"]] == [2, 0, 2]


def _zip(folder: Path) -> bytes:
    return zip_folder(folder, folder.with_suffix(".zip")).read_bytes()


def test_an_archive_sent_with_the_request_is_stored_and_scored_as_a_named_dataset(
    job_server: JobServer, trained: dict[str, Any]
) -> None:
    model, tmp = trained["model"], trained["tmp"]
    folder = make_image_folder(tmp / "sent", {"ant": 3, "bee": 2, "cow": 2}, seed=12)
    server = job_server.server
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        answer = http.post(
            f"/v1/models/{model['id']}/evaluations",
            files={"file": ("sent.zip", _zip(folder), "application/zip")},
            data={"name": "field photos"},
        )
    assert answer.status_code == 202, answer.text
    queued = answer.json()
    with _api(job_server) as api:
        dataset = api.get_dataset(queued["dataset_id"])
        assert dataset["name"] == "field photos"
        done = api.wait_for_evaluation(queued["id"], timeout=TIMEOUT)
        # The same images as a stored dataset, evaluated by id: the same numbers.
        stored = api.upload_dataset(folder)
        by_id = api.wait_for_evaluation(
            api.evaluate_model(model["id"], stored["id"])["id"], timeout=TIMEOUT
        )
    result, expected = done["result"], by_id["result"]
    assert result is not None and expected is not None
    assert result["num_examples"] == 7
    assert [c["support"] for c in result["per_class"]] == [3, 2, 2]
    assert result["confusion_matrix"] == expected["confusion_matrix"]
    assert result["accuracy"] == expected["accuracy"]
    assert result["loss"] == pytest.approx(expected["loss"], abs=1e-12)


def test_a_sent_archive_is_refused_with_nothing_kept_or_fails_naming_unknown_labels(
    job_server: JobServer, trained: dict[str, Any]
) -> None:
    model, tmp = trained["model"], trained["tmp"]
    server = job_server.server
    zoo = _zip(make_image_folder(tmp / "sent-zoo", {"ant": 2, "yak": 2}, seed=13))
    with _api(job_server) as api:
        before = [d["id"] for d in api.list_datasets()]
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        missing = http.post(
            "/v1/models/mdl_" + "a" * 20 + "/evaluations",
            files={"file": ("zoo.zip", zoo, "application/zip")},
        )
        not_an_archive = http.post(
            f"/v1/models/{model['id']}/evaluations",
            files={"file": ("notes.zip", b"just text, not a zip", "application/zip")},
        )
        stray_field = http.post(
            f"/v1/models/{model['id']}/evaluations",
            files={"file": ("zoo.zip", zoo, "application/zip")},
            data={"dataset_id": "ds_x"},
        )
        sent = http.post(
            f"/v1/models/{model['id']}/evaluations",
            files={"file": ("zoo.zip", zoo, "application/zip")},
        )
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    assert (not_an_archive.status_code, not_an_archive.json()["error"]["code"]) == (
        415,
        "unsupported_media_type",
    )
    assert (stray_field.status_code, stray_field.json()["error"]["code"]) == (
        422,
        "invalid_request",
    )
    assert sent.status_code == 202, sent.text
    with _api(job_server) as api:
        after = [d["id"] for d in api.list_datasets()]
        # Only the accepted archive became a dataset.
        assert sorted(set(after) - set(before)) == [sent.json()["dataset_id"]]
        with pytest.raises(EvaluationFailed) as failed:
            api.wait_for_evaluation(sent.json()["id"], timeout=TIMEOUT)
    assert failed.value.code == "unknown_labels"
    assert "yak" in failed.value.message


def test_the_client_sends_a_folder_with_the_evaluation(
    job_server: JobServer, trained: dict[str, Any]
) -> None:
    model, tmp = trained["model"], trained["tmp"]
    folder = make_image_folder(tmp / "client-sent", {"bee": 2, "cow": 3}, seed=21)
    with _api(job_server) as api:
        queued = api.evaluate_model(model["id"], archive=folder, name="sent by the client")
        assert api.get_dataset(queued["dataset_id"] or "")["name"] == "sent by the client"
        done = api.wait_for_evaluation(queued["id"], timeout=TIMEOUT)
        with pytest.raises(ValueError, match="not both"):
            api.evaluate_model(model["id"], "ds_x", archive=folder)
        batch = api.create_batch_prediction(model["id"], archive=folder, top_k=1, format="jsonl")
        finished = api.wait_for_batch_prediction(batch["id"], timeout=TIMEOUT)
    result = done["result"]
    assert result is not None and result["num_examples"] == 5
    assert [c["support"] for c in result["per_class"]] == [0, 2, 3]
    assert (finished["top_k"], finished["format"]) == (1, "jsonl")
    assert finished["result"] is not None and finished["result"]["rows"] == 5
