"""The page's flows, run by node against the real server and its ingest worker (ui_smoke.js),
when node is installed: an upload shown processing with its phase until the dataset is ready (or
failed, with the error that refused it), signed in through the `#key=` link that `bitserve up`
prints, asked for a key on a 401, told which scope a 403 lacks, and without keys where
BITSERVE_AUTH=off; a trained job's curves and its model's confusion matrix, two models side by
side. test_ui_browser.py runs the page in a real browser.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from bitcore.models import create_model
from service.api_keys import Scope
from service.settings import Settings
from tests.imagegen import class_image, encode, make_archive, make_image_folder
from tests.integration.conftest import JobServer, LiveServer, make_key
from tests.integration.ui_helpers import (
    APP_JS,
    SMOKE_JS,
    PageParser,
    _format_number,
    _js_percent,
    _to_fixed,
)
from tests.integration.worker_fixtures import FAST_OVERRIDES
from tests.model_fixtures import publish_model

pytestmark = pytest.mark.integration


# Validation metrics as a job records them (bitcore.train.evaluate), for the model view.
KNOWN_METRICS: dict[str, Any] = {
    "accuracy": 0.7,
    "macro_f1": 0.6508,
    "num_examples": 10,
    "loss": 0.8123,
    "per_class": [
        {"label": "ant", "precision": 0.6667, "recall": 1.0, "f1": 0.8, "support": 4},
        {"label": "bee", "precision": 1.0, "recall": 0.3333, "f1": 0.5, "support": 3},
        {"label": "cat", "precision": 0.6667, "recall": 0.6667, "f1": 0.6667, "support": 3},
    ],
    "confusion_matrix": [[4, 0, 0], [1, 1, 1], [1, 0, 2]],
}
OTHER_METRICS: dict[str, Any] = {
    **KNOWN_METRICS,
    "accuracy": 0.9,
    "macro_f1": 0.9,
    "loss": 0.3,
    "per_class": [
        {**c, "f1": f1} for c, f1 in zip(KNOWN_METRICS["per_class"], (1.0, 0.8, 0.9), strict=True)
    ],
    "confusion_matrix": [[4, 0, 0], [1, 2, 0], [0, 0, 3]],
}


def _known_model(server: LiveServer, metrics: dict[str, Any] | None = None) -> str:
    """A tiny model whose head gives every image the scores ant 0.7, bee 0.2, cat 0.1."""
    model = create_model("tiny-R10x0.25", 3)
    head: torch.nn.Conv2d = model.head.conv  # type: ignore[assignment]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.7, 0.2, 0.1]).log())  # type: ignore[union-attr]
    state = server.app.state
    classes = ["ant", "bee", "cat"]
    model_id, _ = publish_model(
        state.db, state.storage, model, "tiny-R10x0.25", classes, 32, metrics=metrics
    )
    return model_id


def _run_page(
    server_url: str, tmp_path: Path, classes: dict[str, int], **extra: Any
) -> dict[str, Any]:
    """Run ui_smoke.js on the page at `server_url`; its JSON results."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    page = PageParser()
    page.feed(httpx.get(f"{server_url}/", timeout=30).text)
    archive = make_archive(
        make_image_folder(tmp_path / "pets", classes, corrupt={"dog/x.jpg": "empty"})
    )
    png = tmp_path / "leaf.png"
    png.write_bytes(encode(class_image(0, 2, (40, 48))))
    args = {
        "base": server_url,
        "tags": dict(zip(page.ids, page.tags, strict=True)),
        "zip": str(archive),
        "png": str(png),
        **extra,
    }
    done = subprocess.run(
        [node, str(SMOKE_JS), str(APP_JS), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def _markers(plan: dict[str, Any]) -> list[list[Any]]:
    """The chart's marker labels at their steps, for a job's plan."""
    warm = [["warm-up ends", plan["warmup_steps"]]] if plan["warmup_steps"] > 0 else []
    return warm + [["lr ÷10", step] for step in plan["decay_steps"]]


def _schedule_words(plan: dict[str, Any]) -> str:
    warm = plan["warmup_steps"]
    drops = ", ".join(map(str, plan["decay_steps"]))
    return (
        (f"Warm-up ends at step {warm}" if warm else "No warm-up")
        + "; "
        + (f"the learning rate drops ÷10 at step {drops}." if drops else "no learning-rate drops.")
    )


def _confusion(classes: list[str], counts: list[list[int]], caption: str) -> dict[str, Any]:
    """The confusion table the page should draw: counts, and each cell's share of its row."""
    return {
        "className": "confusion",
        "caption": caption,
        "head": "true ↓ / predicted →" + "".join(classes),
        "rows": [[name, *map(str, row)] for name, row in zip(classes, counts, strict=True)],
        "shares": [[_to_fixed(c / sum(row) if sum(row) else 0, 3) for c in row] for row in counts],
    }


def _signed_in(out: dict[str, Any], key: str) -> None:
    """The page took the key from the `#key=` fragment, kept it and removed the fragment."""
    assert out["fragment"] == {"stored": key, "hash": "", "replaced": ["/"], "input": key}


def test_the_page_uploads_plans_follows_cancels_and_predicts(
    client: httpx.Client, live_server_instance: LiveServer, tmp_path: Path
) -> None:
    key = live_server_instance.key
    model_a = _known_model(live_server_instance, KNOWN_METRICS)
    model_b = _known_model(live_server_instance, OTHER_METRICS)
    solo = make_archive(make_image_folder(tmp_path / "solo", {"solo": 3}))
    out = _run_page(
        live_server_instance.url,
        tmp_path,
        {"cat": 3, "dog": 2},
        scenario="cancel",
        hash=f"#key={key}",
        overrides={"steps": "5", "batch_size": "2", "crop": "32", "precrop": "40"},
        modelId=model_a,
        compareId=model_b,
        badZip=str(solo),
    )
    _signed_in(out, key)

    base = client.get("/v1/base-models").json()["items"]
    assert out["baseModels"] == [m["name"] for m in base]
    first_ready = next(m for m in base if m["checkpoint_present"] or not m["requires_checkpoint"])
    assert out["baseModel"] == first_ready["name"]

    assert out["uploadStatus"] == "Uploaded: 5 images in 2 classes."
    dataset = client.get(f"/v1/datasets/{out['datasetId']}").json()
    assert dataset["name"] == "page pets"
    assert out["datasetTitle"] == (
        f"page pets ({dataset['id']}): 5 images, 2 classes, median 48×40 px, "
        f"{dataset['bytes'] / 1000:.1f} KB"
    )
    assert out["classes"] == [["cat", "3"], ["dog", "2"]]
    assert out["rejected"] == ["dog/x.jpg: empty"]
    # The upload answered `processing` at once; the page said so, with the ingestion's phase,
    # until the ingest worker made the dataset ready.
    history = out["uploadHistory"]
    assert history[0] == f"Uploading pets.zip ({dataset['bytes'] / 1000:.1f} KB)…"
    assert history[1] == "Processing page pets: queued…"
    phase = r"Processing page pets: (queued|(extracting|indexing|storing|done)( \d+ / \d+)?)…"
    assert all(re.fullmatch(phase, h) for h in history[1:-1]), history
    assert history[-1] == "Uploaded: 5 images in 2 classes."
    assert out["datasetRow"][:5] == ["page pets", dataset["id"], "ready", "5", "2"]

    assert out["planCaption"] == "Plan for tiny-R10x0.25"
    plan = dict(map(tuple, out["plan"]))
    assert plan["Resize, then random crop"] == "40 → 32 px"
    assert plan["Batch size"] == "2"
    assert plan["Steps"].startswith("5 (warm-up ")
    assert plan["Overridden"] == "batch_size, crop, precrop, steps"

    job_id = out["queued"].split()[1].rstrip(":")
    assert out["queued"] == f"Job {job_id}: queued"
    assert out["progressMax"] == 5
    assert (out["cancelled"], out["cancelDisabled"]) == (f"Job {job_id}: cancelled", True)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["dataset_id"], job["base_model"]) == (
        "cancelled",
        dataset["id"],
        "tiny-R10x0.25",
    )
    assert job["overrides"] == {"steps": 5, "batch_size": 2, "crop": 32, "precrop": 40}

    assert out["prediction"] == "leaf.pngant 70.0% bee 20.0% cat 10.0% "
    assert out["error"] is None

    # The job never ran: its curves are empty, with the plan's schedule marked on both charts.
    plan = job["plan"]
    marks = _markers(plan)
    assert out["cancelCharts"] == [
        {
            "title": "Loss",
            "series": ["step", "training loss", "validation loss", "validation accuracy"],
            "data": [[], [], [], []],
            "markers": marks,
        },
        {
            "title": "Learning rate",
            "series": ["step", "learning rate"],
            "data": [[], []],
            "markers": marks,
        },
    ]
    assert out["cancelCurves"] == "No training step yet. " + _schedule_words(plan)

    # The model view of one model, then of two side by side (models with known metrics).
    assert out["singleText"] == [
        "Accuracy70.0%Macro-F10.651Validation images10Validation loss0.812"
    ]
    per_class, matrix = out["single"]
    assert per_class == {
        "className": "per-class",
        "caption": "Per class, on the validation images",
        "head": "ClassImagesPrecisionRecallF1",
        "rows": [
            ["ant", "4", "0.667", "1.000", "0.800"],
            ["bee", "3", "1.000", "0.333", "0.500"],
            ["cat", "3", "0.667", "0.667", "0.667"],
        ],
    }
    assert out["singleBars"] == [
        _js_percent(c[k]) for c in KNOWN_METRICS["per_class"] for k in ("precision", "recall", "f1")
    ]
    assert matrix == _confusion(
        ["ant", "bee", "cat"],
        KNOWN_METRICS["confusion_matrix"],
        "Confusion matrix: rows are the true class, columns the predicted one; shade: share of "
        "the row",
    )
    summary, f1, first, second = out["compared"]
    assert summary == {
        "className": "compare-summary",
        "caption": "Side by side",
        "head": model_a + model_b,
        "rows": [
            ["Base model", "tiny-R10x0.25", "tiny-R10x0.25"],
            ["Accuracy", "70.0%", "90.0%"],
            ["Macro-F1", "0.651", "0.900"],
            ["Validation loss", "0.812", "0.300"],
            ["Validation images", "10", "10"],
        ],
    }
    assert f1["rows"] == [
        ["ant", "0.800", "1.000"],
        ["bee", "0.500", "0.800"],
        ["cat", "0.667", "0.900"],
    ]
    for table, metrics, model_id in (
        (first, KNOWN_METRICS, model_a),
        (second, OTHER_METRICS, model_b),
    ):
        caption = f"Confusion matrix of {model_id} (rows: true, columns: predicted)"
        assert table == _confusion(["ant", "bee", "cat"], metrics["confusion_matrix"], caption)
    assert out["compareOptions"] == [""]  # "nothing" comes first

    # An archive ingestion refuses: the page shows the failed dataset's error, lists the
    # dataset as failed, and offers it for no plan or job.
    failed = out["failed"]
    assert failed["status"] == "Failed: page solo could not be used."
    assert failed["error"] == (
        "Dataset page solo failed: need at least 2 class folders, found 1: solo "
        "(too_few_classes)\nClasses: solo (3)"
    )
    assert failed["row"][2:4] == ["failed: too_few_classes", "0"]
    assert (failed["selectable"], failed["buttonDisabled"]) == (False, False)


def test_the_page_follows_a_real_job_to_its_model_and_predicts(
    job_server: JobServer, tmp_path: Path
) -> None:
    server, worker = job_server.server, job_server.worker
    overrides = {k: str(v) for k, v in FAST_OVERRIDES.items()}
    try:
        out = _run_page(
            server.url,
            tmp_path,
            {"cat": 4, "dog": 4},
            scenario="train",
            overrides=overrides,
            hash=f"#key={server.key}",
        )
    except AssertionError:
        print(worker.log()[-4000:])
        raise
    _signed_in(out, server.key)
    total = FAST_OVERRIDES["steps"]
    seen = [s for s in out["steps"] if s]  # "" until the first job read-out
    steps = [int(s.split(" / ")[0]) for s in seen]
    assert steps == sorted(steps) and steps[-1] == total, out["steps"]
    assert all(s.endswith(f" / {total}") for s in seen)
    assert [float(v) for v in out["progress"]] == [total, total]  # the bar is full
    loss, lr, ips, eta = out["stats"]  # the last read-out: numbers, not placeholders
    # The done report says 0 images/s; the page shows the rate training had.
    assert float(loss) > 0 and float(lr) >= 0 and float(ips) > 0
    assert re.fullmatch(r"\d+ s", eta)
    model_id = out["result"].split()[1]
    assert model_id.startswith("mdl_")
    assert re.fullmatch(
        rf"Model {model_id} is ready, validation accuracy \d+\.\d%\.", out["result"]
    )
    assert out["status"].endswith(": succeeded") and out["modelSelected"] == model_id
    match = re.fullmatch(r"leaf\.png(cat|dog) (\d+\.\d)% (cat|dog) (\d+\.\d)% ", out["prediction"])
    assert match is not None, out["prediction"]
    assert {match[1], match[3]} == {"cat", "dog"}
    assert float(match[2]) >= float(match[4])
    assert float(match[2]) + float(match[4]) == pytest.approx(100.0, abs=0.11)
    assert out["error"] is None

    # The curves: what GET /v1/jobs/{id}/metrics kept, fetched when the job ended.
    job_id = out["status"].split()[1].rstrip(":")
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as http:
        history = http.get(f"/v1/jobs/{job_id}/metrics").json()
        model = http.get(f"/v1/models/{model_id}").json()
    training, validation = history["training"], history["validation"]
    assert training and training[-1]["step"] == total
    rated = [p["images_per_second"] for p in training if p["images_per_second"]]
    assert ips == _to_fixed(rated[-1], 1)  # training's last rate (the done report says 0)
    assert lr == _format_number(training[-1]["lr"], 5)  # the last step's, not done's 0
    steps = sorted({p["step"] for p in training} | {p["step"] for p in validation})
    at = {p["step"]: p for p in training}
    val = {p["step"]: p for p in validation}
    marks = _markers(history["schedule"])
    assert out["curvesShown"] is True
    assert out["charts"] == [
        {
            "title": "Loss",
            "series": ["step", "training loss", "validation loss", "validation accuracy"],
            "data": [
                steps,
                [at[s]["loss"] if s in at else None for s in steps],
                [val[s]["loss"] if s in val else None for s in steps],
                [val[s]["accuracy"] if s in val else None for s in steps],
            ],
            "markers": marks,
        },
        {
            "title": "Learning rate",
            "series": ["step", "learning rate"],
            "data": [steps, [at[s]["lr"] if s in at else None for s in steps]],
            "markers": marks,
        },
    ]
    assert out["curvesSummary"].startswith(
        f"Step {total} of {total}: training loss {_to_fixed(training[-1]['loss'], 4)}, "
    )
    # The new model's view: its confusion matrix is the API's.
    assert out["qualityModel"] == model_id
    metrics = model["metrics"]
    per_class, matrix = out["quality"]
    assert [r[:2] for r in per_class["rows"]] == [
        [c["label"], str(c["support"])] for c in metrics["per_class"]
    ]
    assert matrix == _confusion(
        model["classes"],
        metrics["confusion_matrix"],
        "Confusion matrix: rows are the true class, columns the predicted one; shade: share of "
        "the row",
    )
    assert out["qualityText"] == [
        f"Accuracy{_to_fixed(100 * metrics['accuracy'], 1)}%"
        f"Macro-F1{_to_fixed(metrics['macro_f1'], 3)}"
        f"Validation images{metrics['num_examples']}"
        f"Validation loss{_to_fixed(metrics['loss'], 3)}"
    ]


def test_the_page_asks_for_a_key_and_names_a_missing_scope(
    live_server_instance: LiveServer, tmp_path: Path
) -> None:
    server = live_server_instance
    predict = make_key(server.app.state.db, server.settings, scopes=(Scope.PREDICT,))
    out = _run_page(
        server.url,
        tmp_path,
        {"cat": 2, "dog": 2},
        scenario="key",
        predictKey=predict,
        adminKey=server.key,
    )
    # No key: the first answer is 401, and the page opens its key panel, focused, saying where
    # `bitserve up` put the key.
    panel = out["panel"]
    assert panel["open"] is True and panel["focused"] == "api-key"
    assert "This server needs an API key" in panel["help"]
    assert "$BITSERVE_HOME/admin.key" in panel["help"]
    assert "(missing_api_key, HTTP 401)" in panel["error"]
    # A predict key cannot list datasets: the 403 names the scope it lacks.
    assert "(insufficient_scope, HTTP 403)" in out["forbidden"]
    assert (
        "Missing scope: this needs a key with train (or admin); this key has predict."
        in (out["forbidden"])
    )
    # The admin key: everything loads, and the key is kept until forgotten.
    assert out["error"] is None and out["stored"] == server.key
    assert out["forgotten"] == {"stored": None, "input": "", "focused": "api-key"}


def test_the_page_needs_no_key_where_auth_is_off(
    start_server: Callable[..., LiveServer], settings: Settings, tmp_path: Path
) -> None:
    server = start_server(settings.model_copy(update={"auth": "off"}), with_key=False)
    out = _run_page(server.url, tmp_path, {"cat": 2, "dog": 2}, scenario="open")
    assert out["baseModels"] and out["error"] is None
    assert out["panelOpen"] is False and out["sentKeys"] == [""]
    assert out["fragment"] == {"stored": None, "hash": "", "replaced": [], "input": ""}
