"""The web page in a real browser (Chromium through Playwright) against a live server and a
real Celery worker: upload a generated dataset, train a tiny job while the page draws its
curves, open the new model, evaluate it on a second dataset uploaded on the page (its confusion
matrix, figures and worst examples' thumbnails), label that dataset with a batch prediction and
download its CSV through the page's link, compare it with a second model.

What a browser adds to the node runs (test_ui_scripts.py, test_ui_views.py, test_ui_flows.py):
the real uPlot drawing into real canvases, the real Content-Security-Policy (a violation is a
console error, and any console error or uncaught exception fails the test), the CSS (the
confusion matrix's shading, the bars' lengths).
Screenshots go to a folder the test prints; with BITSERVE_UPDATE_SCREENSHOTS=1 the model view
is also written to docs/screenshots/web-model.png (the README's picture).

Chromium is Debian's (/usr/bin/chromium, `make browser` installs it); Playwright downloads no
browser. Without it the test fails, saying how to install it: it is never skipped.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from bitcore.models import create_model
from tests.imagegen import make_archive, make_image_folder
from tests.integration.conftest import JobServer
from tests.integration.worker_fixtures import FAST_OVERRIDES
from tests.model_fixtures import publish_model

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[2]
README_SCREENSHOT = REPO / "docs" / "screenshots" / "web-model.png"
CLASSES = {"ant": 10, "bee": 10, "cat": 10}
HELD_OUT = {"ant": 4, "bee": 4, "cat": 4}  # evaluated on the page
TRAIN_TIMEOUT_MS = 180_000
# Long enough (a few seconds on 2 cores) for the page to show the curve at several steps
# before the job ends: progress arrives every 0.2 s on the test server.
JOB_OVERRIDES = {**FAST_OVERRIDES, "steps": 150}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests drive Debian's Chromium. Install it with "
            "`apt-get install chromium` (or `make browser`)."
        )
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class PageErrors:
    """Console errors (CSP violations included) and uncaught exceptions of a page."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} ({message.location})")


def _other_model(job_server: JobServer, classes: list[str]) -> str:
    """A second model with known metrics, to compare the trained one with."""
    state = job_server.server.app.state
    model = create_model("tiny-R10x0.25", len(classes))
    metrics = {
        "accuracy": 0.5,
        "macro_f1": 0.4667,
        "num_examples": 6,
        "loss": 1.05,
        "per_class": [
            {"label": c, "precision": p, "recall": r, "f1": f, "support": 2}
            for c, p, r, f in zip(
                classes, (0.5, 1.0, 0.3333), (1.0, 0.5, 0.0), (0.6667, 0.6667, 0.0), strict=True
            )
        ],
        "confusion_matrix": [[2, 0, 0], [1, 1, 0], [1, 0, 1]],
    }
    model_id, _ = publish_model(
        state.db, state.storage, model, "tiny-R10x0.25", classes, 32, metrics=metrics
    )
    return model_id


def _confusion(page: Page, table: str) -> dict[str, Any]:
    """The confusion table's row labels, counts, --share values and background colours."""
    return page.eval_on_selector(
        table,
        """t => {
          const rows = [...t.tBodies[0].rows];
          return {
            labels: rows.map(r => r.cells[0].textContent),
            counts: rows.map(r => [...r.querySelectorAll("td")].map(td => Number(td.textContent))),
            shares: rows.map(r => [...r.querySelectorAll("td")].map(td => Number(td.style.getPropertyValue("--share")))),
            colours: rows.map(r => [...r.querySelectorAll("td")].map(td => getComputedStyle(td).backgroundColor)),
          };
        }""",
    )


def _shares(counts: list[list[int]]) -> list[list[float]]:
    return [[round(c / sum(row), 3) if sum(row) else 0.0 for c in row] for row in counts]


def _evaluate_on_the_page(
    page: Page,
    url: str,
    headers: dict[str, str],
    model: dict[str, Any],
    tmp_path: Path,
    shots: Path,
) -> str:
    """Upload a second labelled dataset on the page, evaluate the model on it from the model
    view, and check what the page shows against GET /v1/evaluations/{id}; the dataset's id."""
    held_out = make_archive(make_image_folder(tmp_path / "held-out", HELD_OUT, seed=21))
    page.set_input_files("#upload-file", str(held_out))
    page.fill("#upload-name", "browser held-out")
    page.click("#upload-button")
    expect(page.locator("#upload-status")).to_have_text("Uploaded: 12 images in 3 classes.")
    title = page.text_content("#dataset-title") or ""
    dataset_id = title.split("(", 1)[1].split(")", 1)[0]
    # The new dataset is the one offered to evaluate on; the model view still shows the model.
    assert page.input_value("#evaluate-dataset") == dataset_id
    assert page.input_value("#quality-model") == model["id"]
    page.click("#evaluate-button")
    expect(page.locator("#evaluate-status")).to_have_text(
        re.compile(r"^Evaluation eval_\w+: succeeded$"), timeout=TRAIN_TIMEOUT_MS
    )
    evaluation_id = (page.text_content("#evaluate-status") or "").split()[1].rstrip(":")
    page.wait_for_selector("#evaluation-output table.confusion")
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        evaluation = http.get(f"/v1/evaluations/{evaluation_id}").json()
        listed = http.get(f"/v1/models/{model['id']}/evaluations").json()["items"]
    result = evaluation["result"]
    assert (evaluation["dataset_id"], result["num_examples"]) == (dataset_id, 12)
    assert page.eval_on_selector("#evaluate-progress", "p => [p.value, p.max]") == [12, 12]

    # The list: the model's evaluations as the API lists them, the new one first, the
    # fine-tune's validation (made with the model) last.
    rows = page.eval_on_selector(
        "#evaluations-list",
        "t => [...t.tBodies[0].rows].map(r => [...r.cells].slice(0, 4).map(c => c.textContent))",
    )
    assert [r[0] for r in rows] == [e["id"] for e in listed]
    assert rows[0] == [evaluation_id, f"dataset {dataset_id}", "succeeded", _pct(result)]
    assert rows[-1][1:3] == ["validation images (at training)", "succeeded"]

    # The evaluation: its confusion matrix is the API's, cell by cell, shaded by share.
    seen = _confusion(page, "#evaluation-output table.confusion")
    counts = result["confusion_matrix"]
    assert seen["labels"] == result["classes"] == model["classes"]
    assert seen["counts"] == counts and sum(map(sum, counts)) == 12
    assert seen["shares"] == _shares(counts)
    bars = page.eval_on_selector_all(
        "#evaluation-output table.per-class .bar-fill", "els => els.map(e => e.style.width)"
    )
    expected = [c[k] for c in result["per_class"] for k in ("precision", "recall", "f1")]
    assert [float(b.removesuffix("%")) for b in bars] == pytest.approx([100 * v for v in expected])
    figures = page.eval_on_selector(
        "#evaluation-output dl.evaluation-summary",
        "d => [...d.querySelectorAll('dt')].map(dt => [dt.textContent, dt.nextElementSibling.textContent])",
    )
    top_k = result["top_k_accuracy"]
    assert sorted(top_k) == ["1", "3"]  # 3 classes: top-5 is not measured
    assert figures == [
        ["Accuracy", _pct(result)],
        ["Macro-F1", f"{result['macro_f1']:.3f}"],
        ["Top-3 accuracy", f"{100 * top_k['3']:.1f}%"],
        ["Images", "12"],
        ["Loss", f"{result['loss']:.3f}"],
    ]
    if result["most_confused"]:
        pairs = page.eval_on_selector(
            "#evaluation-output table.confused",
            "t => [...t.tBodies[0].rows].map(r => [...r.cells].map(c => c.textContent))",
        )
        assert pairs == [
            [p["label"], p["predicted"], str(p["count"])] for p in result["most_confused"]
        ]

    # The worst examples: one thumbnail each, fetched with the key, shown from blob: URLs
    # (the CSP's img-src allows them; a refused image would be a console error).
    worst = result["worst"]
    assert len(worst) == 12
    thumbs = page.locator("#evaluation-output img.thumb")
    assert thumbs.count() == len(worst)
    for i in range(len(worst)):
        expect(thumbs.nth(i)).to_have_attribute("src", re.compile("^blob:"))
        expect(thumbs.nth(i)).to_have_js_property("complete", True)
    sizes = page.eval_on_selector_all(
        "#evaluation-output img.thumb", "els => els.map(e => [e.naturalWidth, e.naturalHeight])"
    )
    assert all(0 < w <= 128 and 0 < h <= 128 for w, h in sizes), sizes
    captions = page.eval_on_selector_all(
        "#evaluation-output .worst figcaption .path", "els => els.map(e => e.textContent)"
    )
    assert captions == [w["path"] for w in worst]
    page.locator("#evaluations").screenshot(path=str(shots / "evaluation.png"))
    return dataset_id


def _batch_predict_on_the_page(
    page: Page,
    url: str,
    headers: dict[str, str],
    model: dict[str, Any],
    dataset_id: str,
    tmp_path: Path,
    shots: Path,
) -> None:
    """Label the held-out dataset from the model view (a batch prediction, top 2, CSV), then
    download its file through the page's link: the API's output, byte for byte."""
    page.select_option("#batch-dataset", dataset_id)
    page.fill("#batch-top-k", "2")
    page.select_option("#batch-format", "csv")
    page.click("#batch-button")
    link = page.locator("#batch-download")
    expect(link).to_be_visible(timeout=TRAIN_TIMEOUT_MS)
    status = page.text_content("#batch-status") or ""
    match = re.fullmatch(r"Batch prediction (bp_\w+): succeeded, 12 rows", status)
    assert match, status
    batch_id = match.group(1)
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        batch = http.get(f"/v1/batch-predictions/{batch_id}").json()
        output = http.get(f"/v1/batch-predictions/{batch_id}/output").content
        listed = http.get(f"/v1/models/{model['id']}/batch-predictions").json()["items"]
    assert (batch["model_id"], batch["dataset_id"], batch["top_k"], batch["format"]) == (
        model["id"],
        dataset_id,
        2,
        "csv",
    )
    assert batch["result"]["rows"] == 12
    name = f"{batch_id}-predictions.csv"
    assert link.text_content() == f"Download {name} (12 rows, {_size(len(output))})"
    assert page.eval_on_selector("#batch-progress", "p => [p.value, p.max]") == [12, 12]

    # The link (a blob: URL with a download name) saves the file: the API's bytes.
    with page.expect_download() as saving:
        link.click()
    download = saving.value
    assert download.suggested_filename == name
    saved = tmp_path / "downloads" / name
    download.save_as(saved)
    assert saved.read_bytes() == output
    rows = list(csv.DictReader(io.StringIO(output.decode())))
    held_out = tmp_path / "held-out"
    expected = sorted(p.relative_to(held_out).as_posix() for p in held_out.rglob("*.png"))
    assert [r["file"] for r in rows] == expected  # every file of the dataset once, sorted
    assert all(r["label_1"] in model["classes"] and r["error"] == "" for r in rows)

    # The list: the model's batch predictions as the API lists them; its Download, the same.
    table = page.eval_on_selector(
        "#batch-list",
        "t => [...t.tBodies[0].rows].map(r => [...r.cells].slice(0, 5).map(c => c.textContent))",
    )
    assert table == [[b["id"], b["dataset_id"], "succeeded, 12 rows", "csv", "2"] for b in listed]
    with page.expect_download() as again:
        page.get_by_role("button", name=f"Download batch prediction {batch_id}").click()
    again.value.save_as(tmp_path / "downloads" / "again.csv")
    assert (tmp_path / "downloads" / "again.csv").read_bytes() == output
    assert again.value.suggested_filename == name
    page.locator("#batch-predictions").screenshot(path=str(shots / "batch-prediction.png"))


def _watch_the_curve_grow(page: Page) -> list[tuple[int, str]]:
    """(step, the loss chart's pixels as a data URL) each time the read-out's step changes,
    until the job ends: the curve as the page showed it while training."""
    readings: list[tuple[int, str]] = []
    deadline = time.monotonic() + TRAIN_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        seen = page.evaluate(
            """() => {
              const text = document.getElementById("curves-summary").textContent;
              const step = /^Step (\\d+) /.exec(text);
              const canvas = document.querySelector("#curves-charts canvas");
              return {
                step: step ? Number(step[1]) : null,
                pixels: canvas ? canvas.toDataURL() : "",
                ended: document.getElementById("job-result").textContent.startsWith("Model "),
              };
            }"""
        )
        if seen["step"] is not None and (not readings or readings[-1][0] != seen["step"]):
            readings.append((seen["step"], seen["pixels"]))
        if seen["ended"]:
            return readings
        page.wait_for_timeout(50)
    raise AssertionError(f"the job did not end in time; steps shown: {[r[0] for r in readings]}")


def _size(count: int) -> str:
    """formatBytes in app.js: decimal units, one decimal above bytes."""
    return f"{count} B" if count < 1000 else f"{count / 1000:.1f} KB"


def _pct(result: dict[str, Any]) -> str:
    return f"{100 * result['accuracy']:.1f}%"


def test_the_page_trains_draws_curves_and_shows_the_model_in_a_browser(
    job_server: JobServer, browser: Browser, tmp_path: Path
) -> None:
    server = job_server.server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"screenshots: {shots}")
    archive = make_archive(make_image_folder(tmp_path / "insects", CLASSES))

    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors = PageErrors(page)
    page.set_default_timeout(60_000)
    try:
        page.goto(f"{server.url}/#key={server.key}")
        # Waits through locators: a waited-for string expression would be eval()ed in the page,
        # which its CSP (rightly) refuses.
        expect(page.locator("#base-model option").first).to_be_attached()

        page.set_input_files("#upload-file", str(archive))
        page.fill("#upload-name", "browser insects")
        page.click("#upload-button")
        expect(page.locator("#upload-status")).to_have_text(re.compile("^Uploaded"))
        assert page.text_content("#upload-status") == "Uploaded: 30 images in 3 classes."

        page.select_option("#base-model", "tiny-R10x0.25")
        for name, value in JOB_OVERRIDES.items():
            page.fill(f"#ov-{name}", str(value))
        page.fill("#validation-fraction", "0.3")
        page.click("#start-job")
        # Live: the curves follow the progress events while the job trains.
        expect(page.locator("#curves-summary")).to_have_text(
            re.compile("^Step "), timeout=TRAIN_TIMEOUT_MS
        )
        page.locator("#step-train").screenshot(path=str(shots / "training.png"))
        live = _watch_the_curve_grow(page)
        expect(page.locator("#job-result")).to_have_text(
            re.compile("^Model "), timeout=TRAIN_TIMEOUT_MS
        )
        status = page.text_content("#job-status") or ""
        assert status.endswith(": succeeded"), status
        job_id = status.split()[1].rstrip(":")
        model_id = (page.text_content("#job-result") or "").split()[1]
        page.locator("#step-train").screenshot(path=str(shots / "job-done.png"))

        with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as http:
            history = http.get(f"/v1/jobs/{job_id}/metrics").json()
            model = http.get(f"/v1/models/{model_id}").json()
        total = JOB_OVERRIDES["steps"]
        # The curve grew while the job trained: the read-out at two or more steps before the
        # last, in order, and the loss chart redrawn between the first and the last of them.
        steps = [step for step, _ in live]
        before_end = [(step, pixels) for step, pixels in live if step < total]
        assert len(before_end) >= 2 and steps == sorted(steps), steps
        assert before_end[0][1] != before_end[-1][1], steps
        print(f"steps shown while training: {steps}")

        # Two uPlot charts with real canvases; the read-out keeps the training rate, not 0.0.
        assert page.locator("#curves-charts .uplot").count() == 2
        assert page.locator("#curves-charts canvas").count() == 2
        assert page.locator("#curves-charts .u-title").all_text_contents() == [
            "Loss",
            "Learning rate",
        ]
        ips = page.text_content("#stat-ips") or ""
        assert float(ips) > 0
        summary = page.text_content("#curves-summary") or ""
        assert summary.startswith(f"Step {total} of {total}: training loss "), summary
        assert history["training"][-1]["step"] == total

        # The model view shows the new model: its confusion matrix is the API's, cell by cell.
        page.wait_for_selector("#quality-output table.confusion")
        assert page.input_value("#quality-model") == model_id
        metrics = model["metrics"]
        counts = metrics["confusion_matrix"]
        seen = _confusion(page, "#quality-output table.confusion")
        assert seen["labels"] == model["classes"] == sorted(CLASSES)
        assert seen["counts"] == counts
        assert seen["shares"] == _shares(counts)
        assert sum(map(sum, counts)) == metrics["num_examples"] == 9
        # The shading is the CSS's: a cell with all of its row is darker than an empty one.
        colours = {
            share: colour
            for row_s, row_c in zip(seen["shares"], seen["colours"], strict=True)
            for share, colour in zip(row_s, row_c, strict=True)
        }
        if 0.0 in colours and 1.0 in colours:
            assert colours[0.0] != colours[1.0]
        # Per-class bars: precision, recall and F1 of each class, as long as their values.
        bars = page.eval_on_selector_all(
            "#quality-output table.per-class .bar-fill", "els => els.map(e => e.style.width)"
        )
        expected = [c[k] for c in metrics["per_class"] for k in ("precision", "recall", "f1")]
        assert len(bars) == 3 * len(CLASSES)
        assert [float(b.removesuffix("%")) for b in bars] == pytest.approx(
            [100 * v for v in expected]
        )
        widths = page.eval_on_selector_all(
            "#quality-output table.per-class .bar-fill", "els => els.map(e => e.offsetWidth)"
        )
        track = page.eval_on_selector("#quality-output .bar", "e => e.clientWidth")
        assert widths == pytest.approx([v * track for v in expected], abs=1.5)
        summary_text = page.text_content("#quality-output dl.quality-summary") or ""
        assert f"Accuracy{100 * metrics['accuracy']:.1f}%" in summary_text
        assert "Macro-F1" in summary_text
        page.locator("#step-quality").screenshot(path=str(shots / "model.png"))
        if os.environ.get("BITSERVE_UPDATE_SCREENSHOTS") == "1":
            README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shots / "model.png", README_SCREENSHOT)

        held_out = _evaluate_on_the_page(page, server.url, server.headers, model, tmp_path, shots)
        _batch_predict_on_the_page(
            page, server.url, server.headers, model, held_out, tmp_path, shots
        )

        # Side by side with a second model: both matrices, each its own model's.
        other = _other_model(job_server, model["classes"])
        page.click("#refresh-lists")
        page.wait_for_selector(f"#compare-model option[value='{other}']", state="attached")
        page.select_option("#compare-model", other)
        page.wait_for_selector("#quality-output .side-by-side table.confusion >> nth=1")
        first = _confusion(page, "#quality-output .side-by-side .side:nth-child(1) table")
        second = _confusion(page, "#quality-output .side-by-side .side:nth-child(2) table")
        assert first["counts"] == counts
        assert second["counts"] == [[2, 0, 0], [1, 1, 0], [1, 0, 1]]
        rows = page.eval_on_selector(
            "#quality-output table.compare-summary",
            "t => [...t.tBodies[0].rows].map(r => [...r.cells].map(c => c.textContent))",
        )
        assert rows[1] == ["Accuracy", f"{100 * metrics['accuracy']:.1f}%", "50.0%"]
        assert rows[2][0] == "Macro-F1" and rows[2][2] == "0.467"
        f1_bars = page.locator("#quality-output table.compare-f1 .bar-fill").count()
        assert f1_bars == 2 * len(CLASSES)
        page.locator("#step-quality").screenshot(path=str(shots / "compare.png"))

        # "Details" in the models list opens that model alone (compared with itself: no table).
        # (The buttons' accessible names say which row they act on.)
        page.get_by_role("button", name=f"How good model {other} is").click()
        expect(page.locator("#quality-output h3")).to_have_text(re.compile(f"^Model {other} "))
        assert _confusion(page, "#quality-output table.confusion")["counts"] == second["counts"]

        # "Show" on the ended job: its curves again, from the metrics endpoint alone.
        page.get_by_role("button", name=f"Show job {job_id} and its training curves").click()
        expect(page.locator("#curves-summary")).to_have_text(summary)
        assert page.locator("#curves-charts .uplot").count() == 2  # the old charts went
        assert page.text_content("#stat-ips") == ips
    finally:
        page.screenshot(path=str(shots / "page.png"), full_page=True)
        page.close()
    assert errors.errors == []
