"""The web page over real HTTP (uvicorn): GET /, its static files, and that its script calls only
routes the app really has (each api("METHOD", `path`) against /openapi.json).

The script's pure parts (the Server-Sent Events parser, the formatters, the error text, the
URL fragment's key, the ingestion phase, the training curves' data, the model view's figures)
are run with node when it is installed; no browser is needed. So are the page's flows, against
the real server and its ingest worker (ui_smoke.js): an upload shown processing with its phase
until the dataset is ready (or failed, with the error that refused it), signed in through the
`#key=` link that `bitserve up` prints, asked for a key on a 401, told which scope a 403 lacks,
and without keys where BITSERVE_AUTH=off; a trained job's curves and its model's confusion
matrix, two models side by side. test_ui_browser.py runs the page in a real browser.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from html.parser import HTMLParser
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
from tests.integration.worker_fixtures import FAST_OVERRIDES
from tests.model_fixtures import publish_model

pytestmark = pytest.mark.integration

STATIC = Path(__file__).resolve().parents[2] / "service" / "static"
APP_JS = STATIC / "app.js"
CURVES_JS = STATIC / "curves.js"
QUALITY_JS = STATIC / "quality.js"
DEPLOYMENTS_JS = STATIC / "deployments.js"
UPLOT_JS = STATIC / "vendor" / "uplot" / "uPlot.iife.min.js"
# In the order index.html loads them (classic scripts: one global scope).
PAGE_SCRIPTS = [UPLOT_JS, CURVES_JS, QUALITY_JS, APP_JS, DEPLOYMENTS_JS]
# The scripts that talk to the API (through app.js's api()) and look elements up with $().
CALLING_SCRIPTS = [APP_JS, DEPLOYMENTS_JS]
SMOKE_JS = Path(__file__).resolve().parent / "ui_smoke.js"
PAGE_IDS = {
    "error",
    "settings",
    "api-key",
    "api-key-help",
    "forget-key",
    "upload-form",
    "upload-file",
    "upload-name",
    "upload-button",
    "dataset-summary",
    "dataset-classes",
    "dataset-rejected",
    "dataset-select",
    "base-model",
    "plan-button",
    "plan-output",
    "serving-precision",
    "start-job",
    "cancel-job",
    "job-status",
    "job-progress",
    "stat-step",
    "stat-loss",
    "stat-lr",
    "stat-ips",
    "stat-eta",
    "model-select",
    "drop-zone",
    "predict-file",
    "predict-results",
    "datasets-list",
    "jobs-list",
    "models-list",
    "job-curves",
    "curves-summary",
    "curves-charts",
    "step-quality",
    "quality-model",
    "compare-model",
    "quality-output",
    "evaluations",
    "evaluate-form",
    "evaluate-dataset",
    "evaluate-button",
    "evaluate-status",
    "evaluate-progress",
    "evaluations-list",
    "evaluation-output",
    "step-deployments",
    "deploy-form",
    "deploy-name",
    "deploy-model",
    "deploy-button",
    "deploy-status",
    "deployments-list",
    "deployment-detail",
    "change-form",
    "change-model",
    "change-second",
    "shadow-model",
    "change-button",
    "shadow-button",
    "rollback-button",
    "stats-refresh",
    "deployment-stats",
    "deployment-history",
}
# api("GET", `/v1/datasets/${seg(id)}/plan`, ...) and apiStream("GET", `...`, ...)
CALL = re.compile(r"\bapi(?:Stream)?\(\s*\"(GET|POST|PUT|PATCH|DELETE)\"\s*,\s*`([^`]*)`")


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.tags: list[str] = []  # the tag of each id, in the same order
        self.label_for: list[str] = []
        self.controls: list[str] = []  # ids of input/select/textarea
        self.assets: list[str] = []  # src/href of script, link, img

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(str(a["id"]))
            self.tags.append(tag)
        if tag == "label" and a.get("for"):
            self.label_for.append(str(a["for"]))
        if tag in ("input", "select", "textarea"):
            self.controls.append(str(a.get("id")))
        if tag in ("script", "img") and a.get("src"):
            self.assets.append(str(a["src"]))
        if tag == "link" and a.get("href"):
            self.assets.append(str(a["href"]))


def _page(client: httpx.Client) -> PageParser:
    parser = PageParser()
    parser.feed(client.get("/").text)
    return parser


def test_the_page_is_served_at_root_with_its_elements(client: httpx.Client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.text == (STATIC / "index.html").read_text()

    page = _page(client)
    assert set(page.ids) >= PAGE_IDS, PAGE_IDS - set(page.ids)
    assert len(page.ids) == len(set(page.ids)), "duplicate ids"
    # Every form control has a label, and every label names a control that exists.
    assert set(page.controls) <= set(page.label_for), set(page.controls) - set(page.label_for)
    assert set(page.label_for) <= set(page.ids)
    # Only this server's own files: nothing from the internet.
    assert page.assets == [
        "data:,",  # the (empty) icon: no request for /favicon.ico
        "/ui/vendor/uplot/uPlot.min.css",
        "/ui/style.css",
        "/ui/vendor/uplot/uPlot.iife.min.js",
        "/ui/curves.js",
        "/ui/quality.js",
        "/ui/app.js",
        "/ui/deployments.js",
    ]


@pytest.mark.parametrize(
    ("path", "media_type"),
    [
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
        ("/ui/index.html", "text/html; charset=utf-8"),
        ("/ui/curves.js", "text/javascript; charset=utf-8"),
        ("/ui/quality.js", "text/javascript; charset=utf-8"),
        ("/ui/deployments.js", "text/javascript; charset=utf-8"),
        ("/ui/vendor/uplot/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
        ("/ui/vendor/uplot/uPlot.min.css", "text/css; charset=utf-8"),
    ],
)
def test_static_files_have_their_types(client: httpx.Client, path: str, media_type: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.content == (STATIC / path.removeprefix("/ui/")).read_bytes()
    assert response.headers["content-security-policy"].startswith("default-src 'self';")


@pytest.mark.parametrize(
    "path",
    [
        "/ui/missing.js",
        "/ui/..%2Fapp.py",
        "/ui/%2E%2E%2Fsettings.py",
        "/ui/vendor/uplot/README.md",  # in the folder, but not a file the page loads
        "/ui/vendor/uplot/%2E%2E/%2E%2E/app.js",
    ],
)
def test_only_listed_files_are_served(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def _calls() -> list[tuple[str, str]]:
    """(method, path template with {} for each ${...}) of every API call in the page's
    scripts."""
    source = "\n".join(script.read_text() for script in CALLING_SCRIPTS)
    return [(m, re.sub(r"\$\{[^}]*\}", "{}", p)) for m, p in CALL.findall(source)]


def test_the_script_calls_only_routes_in_the_openapi(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    routes = {
        (method.upper(), re.sub(r"\{[^}]*\}", "{}", path))
        for path, operations in spec["paths"].items()
        for method in operations
    }
    calls = _calls()
    missing = sorted(set(calls) - routes)
    assert not missing, f"the page calls routes the app does not have: {missing}"
    # The calls the page is built around are all there (the regex did not silently miss them).
    assert {
        ("GET", "/v1/base-models"),
        ("POST", "/v1/datasets"),
        ("GET", "/v1/datasets/{}"),
        ("GET", "/v1/datasets/{}/events"),
        ("GET", "/v1/datasets/{}/plan"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs/{}/events"),
        ("POST", "/v1/jobs/{}/cancel"),
        ("POST", "/v1/models/{}/predict"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/{}"),
        ("GET", "/v1/jobs/{}"),
        ("GET", "/v1/jobs/{}/metrics"),
        ("GET", "/v1/models/{}/evaluations"),
        ("POST", "/v1/models/{}/evaluations"),
        ("GET", "/v1/evaluations/{}"),
        ("GET", "/v1/evaluations/{}/examples/{}"),
        ("GET", "/v1/models/{}/batch-predictions"),
        ("POST", "/v1/models/{}/batch-predictions"),
        ("GET", "/v1/batch-predictions/{}"),
        ("POST", "/v1/batch-predictions/{}/cancel"),
        ("GET", "/v1/batch-predictions/{}/output"),
        ("GET", "/v1/deployments"),
        ("POST", "/v1/deployments"),
        ("GET", "/v1/deployments/{}"),
        ("PATCH", "/v1/deployments/{}"),
        ("DELETE", "/v1/deployments/{}"),
        ("POST", "/v1/deployments/{}/rollback"),
        ("GET", "/v1/deployments/{}/history"),
        ("GET", "/v1/deployments/{}/stats"),
    } <= set(calls)
    # No request bypasses api(): every /v1 path literal in the script is one of the calls.
    sources = "\n".join(script.read_text() for script in CALLING_SCRIPTS)
    literals = re.findall(r"[`\"'](/v1/[^`\"']*)[`\"']", sources)
    assert len(literals) == len(calls)
    assert "/" not in spec["paths"]  # the page is not part of the API


def test_every_element_the_script_looks_up_exists(client: httpx.Client) -> None:
    sources = "\n".join(script.read_text() for script in CALLING_SCRIPTS)
    wanted = set(re.findall(r"\$\(\"([a-z0-9-]+)\"\)", sources))
    wanted |= {f"ov-{n}" for n in ("steps", "batch_size", "base_lr", "crop", "precrop")}
    assert len(wanted) > 20
    assert wanted <= set(_page(client).ids), wanted - set(_page(client).ids)


NODE_CHECK = r"""
const m = require(process.argv[1]);
const out = {};
const run = (chunks) => {
  const events = [];
  const p = new m.SseParser((name, data) => events.push([name, data]));
  for (const c of chunks) p.push(c);
  return events;
};
const text = ": ping\r\n\r\nevent: status\r\ndata: {\"a\":1}\r\n\r\n" +
  "event: progress\ndata: line1\ndata: line2\n\nevent: empty\r\n\r\ndata:no-space\r\rdata: tail";
out.whole = run([text]);
out.chars = run(Array.from(text));
out.crlfSplit = run(["event: done\r", "\ndata: x\r", "\n\r", "\n"]);
out.durations = [0, 59.4, 65, 3725, null].map(m.formatDuration);
out.bytes = [0, 999, 1234567].map(m.formatBytes);
out.numbers = [m.formatNumber(0.00012, 4), m.formatNumber(0.5, 4), m.formatNumber(null, 2)];
out.error = m.describeError(new m.ApiError(422, "too_few_images", "class b has 1 image",
  {classes: [{name: "b", count: 1}]}));
out.unauthorized = m.describeError(new m.ApiError(401, "missing_api_key", "no key", {}));
out.forbidden = m.describeError(new m.ApiError(403, "insufficient_scope", "lacks train",
  {needed: ["train"], scopes: ["predict"]}));
out.notAdmin = m.describeError(new m.ApiError(403, "insufficient_scope", "lacks admin",
  {needed: ["admin"], scopes: []}));
out.fragments = ["#key=bsk_a_b", "#key=bsk_a_b&tab=jobs", "#tab=jobs", "", "#key="].map(m.keyFromFragment);
out.keyHelp = m.KEY_HELP;
out.ingest = [null, {phase: "queued", done: null, total: null}, {phase: "extracting", done: 3, total: 10},
  {phase: "storing", done: null, total: null}].map(m.describeIngest);
out.datasetStatus = [
  {status: "ready", progress: null},
  {status: "processing", progress: {phase: "indexing", done: 4, total: 10}},
  {status: "failed", progress: null, error: {code: "archive_unsafe", message: "m"}},
].map(m.datasetStatus);
console.log(JSON.stringify(out));
"""


def test_the_scripts_pure_parts_with_node() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    subprocess.run([node, "--check", str(APP_JS)], check=True, timeout=30)
    done = subprocess.run(
        [node, "-e", NODE_CHECK, str(APP_JS)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    expected = [
        ["status", '{"a":1}'],
        ["progress", "line1\nline2"],
        ["message", "no-space"],
    ]
    assert out["whole"] == expected  # "data: tail" has no blank line after it: not an event
    assert out["chars"] == expected  # byte by byte, \r\n split across chunks
    assert out["crlfSplit"] == [["done", "x"]]
    assert out["durations"] == ["0 s", "59 s", "1 min 05 s", "1 h 02 min", "–"]
    assert out["bytes"] == ["0 B", "999 B", "1.2 MB"]
    assert out["numbers"] == ["1.20e-4", "0.5000", "–"]
    assert out["error"] == ("class b has 1 image (too_few_images, HTTP 422)\nClasses: b (1)")
    assert out["unauthorized"] == (
        "no key (missing_api_key, HTTP 401)\nEnter an API key in the API key panel above."
    )
    assert out["forbidden"] == (
        "lacks train (insufficient_scope, HTTP 403)\n"
        "Missing scope: this needs a key with train (or admin); this key has predict."
    )
    assert out["notAdmin"].endswith(
        "Missing scope: this needs a key with admin; this key has none."
    )
    assert out["fragments"] == [
        {"key": "bsk_a_b", "rest": ""},
        {"key": "bsk_a_b", "rest": "#tab=jobs"},
        None,
        None,
        {"key": "", "rest": ""},
    ]
    assert "$BITSERVE_HOME/admin.key" in out["keyHelp"] and "bitserve keys create" in out["keyHelp"]
    assert out["ingest"] == ["processing", "queued", "extracting 3 / 10", "storing"]
    assert out["datasetStatus"] == [
        "ready",
        "processing (indexing 4 / 10)",
        "failed: archive_unsafe",
    ]


CURVES_CHECK = r"""
const c = require(process.argv[1]);
const q = require(process.argv[2]);
const out = {};
const store = new c.CurveStore("job_x");
store.setPlan({warmup_steps: 2, decay_steps: [5, 8], total_steps: 10});
store.setPlan({warmup_steps: 9, decay_steps: [], total_steps: 99});  // the first plan stays
out.empty = store.describe();
const added = [
  {phase: "preparing", step: 0, loss: null, lr: null, images_per_second: null},
  {phase: "training", step: 1, loss: 2.5, lr: 0.0, images_per_second: 40},
  {phase: "training", step: 3, loss: 2.0, lr: 0.003, images_per_second: 44},
  {phase: "training", step: 3, loss: 2.0, lr: 0.003, images_per_second: 45},  // the same again
  {phase: "training", step: 2, loss: 2.2, lr: 0.003, images_per_second: 43},  // resumed at 2
  {phase: "training", step: 3, loss: 2.0, lr: 0.003, images_per_second: 45},
].map((p) => store.addProgress(p));
out.added = added;
out.afterResume = store.training.map((p) => [p.step, p.loss]);
out.liveRate = store.rate;
// The history arrives (with a validation point); the live step 3 is kept, step 2 and 1 replaced.
store.setMetrics({
  job_id: "job_x", status: "running", stride: 1,
  schedule: {warmup_steps: 2, decay_steps: [6, 8], total_steps: 10},
  training: [{step: 1, loss: 2.4, lr: 0.0, images_per_second: 39}, {step: 2, loss: 2.1, lr: 0.0015, images_per_second: 41}],
  validation: [{step: 2, accuracy: 0.5, loss: 1.9}],
});
out.columns = store.columns();
out.markers = store.markers();
store.addProgress({phase: "training", step: 4, loss: 1.5, lr: 0.003, images_per_second: 0});  // 0: not a rate
store.setMetrics({training: [], validation: [{step: 4, accuracy: 0.75, loss: null}],
  schedule: {warmup_steps: 2, decay_steps: [6, 8], total_steps: 10}});
out.steps = store.columns().steps;
out.rates = [
  {phase: "training", images_per_second: 12.5},
  {phase: "evaluating", images_per_second: 0},
  {phase: "done", images_per_second: 0},
  {phase: "preparing", images_per_second: null},
  null,
].map((p) => store.rateFor(p));
out.unknownRate = new c.CurveStore("job_y").rateFor({phase: "done", images_per_second: 0});
out.lrs = [
  {phase: "training", lr: 0.002},
  {phase: "evaluating", lr: 0},
  {phase: "done", lr: 0},
  {phase: "preparing", lr: null},
].map((p) => store.lrFor(p));
out.fromHistory = (() => {
  const s = new c.CurveStore("job_z");
  s.setMetrics({training: [{step: 1, loss: 1, lr: 0, images_per_second: 30}, {step: 2, loss: 1, lr: 0, images_per_second: 0}], validation: []});
  return s.rateFor({phase: "done", images_per_second: 0});
})();
out.summary = store.describe();
out.lrTexts = [0, 0.003, 0.0123456, 3e-5, 0.00012345, null].map((v) => c.lrText(v));
// Thinning: 2500 live steps keep at most CURVE_MAX_POINTS, the first and the last among them.
const long = new c.CurveStore("job_long");
for (let i = 1; i <= 2500; i += 1) long.addProgress({phase: "training", step: i, loss: 1 / i, lr: 0.1});
out.thinned = [long.training.length <= c.CURVE_MAX_POINTS, long.training[0].step,
  long.training[long.training.length - 1].step];
out.diverged = (() => {
  const s = new c.CurveStore("j");
  s.addProgress({phase: "training", step: 1, loss: null, lr: 0.1, images_per_second: 5});
  return [s.columns().loss, s.describe()];
})();
out.noWarmup = (() => {
  const s = new c.CurveStore("j");
  s.setPlan({warmup_steps: 0, decay_steps: [], total_steps: 3});
  return [s.markers(), s.describe()];
})();

out.shares = q.rowShares([[3, 1, 0], [0, 0, 0], [1, 1, 2]]);
const a = {id: "mdl_a", base_model: "tiny", classes: ["ant", "bee"], metrics: {accuracy: 0.75, macro_f1: 0.7333,
  loss: 0.5, num_examples: 8, per_class: [{label: "ant", f1: 0.8}, {label: "bee", f1: 0.6667}],
  confusion_matrix: [[4, 0], [2, 2]]}};
const b = {id: "mdl_b", base_model: "tiny", classes: ["bee", "cat"], metrics: {accuracy: null, macro_f1: null,
  loss: null, num_examples: null, per_class: [{label: "cat", f1: 0.5}], confusion_matrix: []}};
out.summaryRows = q.compareSummary(a, b);
out.f1 = q.compareF1(a, b);
out.validation = [q.hasValidation(a), q.hasValidation(b), q.hasValidation({metrics: null})];
const evaluation = {id: "eval_x", model_id: "mdl_a", dataset_id: "ds_x", source: "dataset", status: "succeeded",
  result: {accuracy: 0.75, macro_f1: 0.7333, loss: 0.61234, num_examples: 12, skipped: 1,
    top_k_accuracy: {"5": 1.0, "1": 0.75, "3": 0.9167}, classes: ["ant", "bee"], per_class: [],
    confusion_matrix: [[1, 0], [0, 1]]}};
out.evalFigures = q.evaluationFigures(evaluation.result);
out.validationFigures = q.evaluationFigures({...evaluation.result, top_k_accuracy: null, skipped: 0});
out.evalModel = q.evaluationAsModel(evaluation).classes;
out.evalStatus = [
  {status: "queued", progress: {done: 0, total: null}},
  {status: "running", progress: {done: 40, total: 120}},
  {status: "running", progress: {done: 3, total: null}},
  {status: "failed", error: {code: "unknown_labels", message: "m"}},
  {status: "succeeded"},
].map(q.evaluationStatus);
out.evalSource = [evaluation, {source: "validation", dataset_id: null}, {source: "dataset", dataset_id: null}]
  .map(q.evaluationSource);
const shards = (sd, st, id, it) => ({shards_done: sd, shards_total: st, images_done: id, images_total: it});
out.batchStatus = [
  {status: "queued", progress: shards(0, null, 0, null)},
  {status: "running", progress: shards(0, null, 0, null)},
  {status: "running", progress: shards(2, 5, 128, 300)},
  {status: "cancelling", progress: shards(3, 5, 192, 300)},
  {status: "failed", error: {code: "dataset_failed", message: "m"}},
  {status: "succeeded", result: {rows: 300, errors: 0}},
  {status: "succeeded", result: {rows: 1, errors: 1}},
  {status: "succeeded", result: {rows: 30, errors: 2}},
  {status: "cancelled"},
].map(q.batchStatus);
out.batchFileName = [{id: "bp_x", format: "csv"}, {id: "bp_y", format: "jsonl"}].map(q.batchFileName);
console.log(JSON.stringify(out));
"""


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    return node


def test_the_curves_and_model_views_pure_parts_with_node() -> None:
    node = _node()
    for script in (CURVES_JS, QUALITY_JS):
        subprocess.run([node, "--check", str(script)], check=True, timeout=30)
    done = subprocess.run(
        [node, "-e", CURVES_CHECK, str(CURVES_JS), str(QUALITY_JS)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["empty"] == (
        "No training step yet. Warm-up ends at step 2; the learning rate drops ÷10 at step 5, 8."
    )
    # Only training reports are points; a repeated one changes nothing, an earlier step (the
    # job resumed from a checkpoint) drops the points from it on.
    assert out["added"] == [False, True, True, False, True, True]
    assert out["afterResume"] == [[1, 2.5], [2, 2.2], [3, 2.0]]
    assert out["liveRate"] == 45
    assert out["columns"] == {
        "steps": [1, 2, 3],
        "loss": [2.4, 2.1, 2.0],
        "lr": [0.0, 0.0015, 0.003],
        "valLoss": [None, 1.9, None],
        "valAccuracy": [None, 0.5, None],
    }
    # The endpoint's schedule replaces the plan's.
    assert out["markers"] == [
        {"step": 2, "label": "warm-up ends"},
        {"step": 6, "label": "lr ÷10"},
        {"step": 8, "label": "lr ÷10"},
    ]
    assert out["steps"] == [1, 2, 3, 4]  # an empty history keeps every live point
    # Evaluating/done report 0 images/s: the last training rate (45) is shown instead.
    assert out["rates"] == [12.5, 45, 45, None, None]
    assert out["unknownRate"] is None  # never 0.0 for a finished job: unknown is "–"
    assert out["lrs"] == [0.002, 0.003, 0.003, None]  # 0.003: step 4's, the last one
    assert out["fromHistory"] == 30  # the history's last non-zero rate
    assert out["summary"] == (
        "Step 4 of 10: training loss 1.5000, learning rate 0.003. Warm-up ends at step 2; "
        "the learning rate drops ÷10 at step 6, 8. Validation at step 4: accuracy 75.0%."
    )
    assert out["lrTexts"] == ["0", "0.003", "0.0123", "3.00e-5", "1.23e-4", "–"]
    assert out["thinned"] == [True, 1, 2500]
    assert out["diverged"] == [[None], "Step 1: training loss – (diverged), learning rate 0.1."]
    assert out["noWarmup"] == [[], "No training step yet. No warm-up; no learning-rate drops."]

    assert out["shares"] == [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0.25, 0.5]]
    assert out["summaryRows"] == [
        ["Base model", "tiny", "tiny"],
        ["Accuracy", "75.0%", "–"],
        ["Macro-F1", "0.733", "–"],
        ["Validation loss", "0.500", "–"],
        ["Validation images", "8", "–"],
    ]
    assert out["f1"] == [
        {"label": "ant", "a": 0.8, "b": None},
        {"label": "bee", "a": 0.6667, "b": None},
        {"label": "cat", "a": None, "b": 0.5},
    ]
    assert out["validation"] == [True, False, False]
    # An evaluation's figures: top-k in order (top-1 is the accuracy), the skipped images.
    assert out["evalFigures"] == [
        ["Accuracy", "75.0%"],
        ["Macro-F1", "0.733"],
        ["Top-3 accuracy", "91.7%"],
        ["Top-5 accuracy", "100.0%"],
        ["Images", "12"],
        ["Skipped (could not be decoded)", "1"],
        ["Loss", "0.612"],
    ]
    assert out["validationFigures"][2] == [
        "Top-k accuracy",
        "not measured (validation at training scores top-1 only)",
    ]
    assert out["evalModel"] == ["ant", "bee"]
    assert out["evalStatus"] == [
        "queued",
        "running, 40 / 120 images",
        "running, 3 / ? images",
        "failed: unknown_labels",
        "succeeded",
    ]
    assert out["evalSource"] == [
        "dataset ds_x",
        "validation images (at training)",
        "a deleted dataset",
    ]
    assert out["batchStatus"] == [
        "queued",
        "running",
        "running, shard 2 / 5, 128 / 300 images",
        "cancelling, shard 3 / 5, 192 / 300 images",
        "failed: dataset_failed",
        "succeeded, 300 rows",
        "succeeded, 1 row (1 error)",
        "succeeded, 30 rows (2 errors)",
        "cancelled",
    ]
    assert out["batchFileName"] == ["bp_x-predictions.csv", "bp_y-predictions.jsonl"]


SHARED_SCOPE_CHECK = r"""
const fs = require("fs");
const vm = require("vm");
// The page's scripts as the browser runs them: classic scripts, one global scope, in order. A
// name declared twice (const/class) would stop the page with a SyntaxError.
const context = vm.createContext({});
for (const file of process.argv.slice(1)) vm.runInContext(fs.readFileSync(file, "utf8"), context, {filename: file});
console.log(JSON.stringify(vm.runInContext(
  "[typeof uPlot, typeof CurveStore, typeof TrainingCurves, typeof qualityView, typeof comparisonView, typeof SseParser, typeof deploymentStatsTable, typeof initDeployments]",
  context)));
"""


def test_the_page_scripts_share_one_scope_without_clashes() -> None:
    node = _node()
    done = subprocess.run(
        [node, "-e", SHARED_SCOPE_CHECK, *map(str, PAGE_SCRIPTS)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["function"] * 8


DEPLOYMENTS_CHECK = r"""
const d = require(process.argv[1]);
const out = {};
const a = {model_id: "mdl_a", weight: 90};
const b = {model_id: "mdl_b", weight: 10};
out.splits = [[{model_id: "mdl_a", weight: 1}], [a, b], [{model_id: "x", weight: 1}, {model_id: "y", weight: 2}], []]
  .map(d.splitText);
out.targets = [null, {targets: [a, b], shadow_model_id: "mdl_c"}, {targets: [a], shadow_model_id: null}].map(d.targetsText);
out.history = d.historyTexts({version: 3, action: "rolled_back", actor: "key_x", at: "2024-01-01T00:00:00Z",
  before: {targets: [a, b], shadow_model_id: null}, after: {targets: [{model_id: "mdl_a", weight: 1}], shadow_model_id: null}});
out.created = d.historyTexts({version: 1, action: "created", actor: null, before: null,
  after: {targets: [{model_id: "mdl_a", weight: 1}], shadow_model_id: null}});
const stats = {deployment: "pets", version: 2, models: [
  {model_id: "mdl_a", role: "target", weight: 90, requests: 9, errors: 1, images: 8,
   latency_ms: {mean: 12.3456, p50: 25, p95: null}, top1_labels: {"1": 2, ant: 5, bee: 2}, agreement: null},
  {model_id: "mdl_b", role: "target", weight: 10, requests: 0, errors: 0, images: 0, latency_ms: null,
   top1_labels: {}, agreement: null},
  {model_id: "mdl_c", role: "shadow", weight: null, requests: 8, errors: 0, images: 8,
   latency_ms: {mean: 4, p50: 5, p95: 10}, top1_labels: {ant: 8}, agreement: {compared: 8, agreed: 7}},
  {model_id: "mdl_d", role: "shadow", weight: null, requests: 0, errors: 0, images: 0, latency_ms: null,
   top1_labels: {}, agreement: {compared: 0, agreed: 0}},
]};
out.rows = d.statsRows(stats);
out.top = stats.models.map((m) => d.topLabels(m, 2));
out.changes = [
  ["mdl_a", "90", "", "10"], ["mdl_a", "90", "mdl_b", "10"], ["mdl_a", " 3 ", "mdl_b", "1"],
  ["", "1", "mdl_b", "1"], ["mdl_a", "1", "mdl_a", "1"], ["mdl_a", "0", "mdl_b", "1"],
  ["mdl_a", "1.5", "mdl_b", "1"], ["mdl_a", "10001", "mdl_b", "1"], ["mdl_a", "", "mdl_b", "1"],
].map((c) => d.changeBody(...c));
out.creates = [[" pets ", "mdl_a"], ["Pets", "mdl_a"], ["my_pets", "mdl_a"], ["-pets", "mdl_a"],
  ["a".repeat(63), "mdl_a"], ["a".repeat(64), "mdl_a"], ["pets", ""]].map((c) => d.createBody(...c));
console.log(JSON.stringify(out));
"""


def test_the_deployments_views_pure_parts_with_node() -> None:
    node = _node()
    subprocess.run([node, "--check", str(DEPLOYMENTS_JS)], check=True, timeout=30)
    done = subprocess.run(
        [node, "-e", DEPLOYMENTS_CHECK, str(DEPLOYMENTS_JS)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["splits"] == [
        "mdl_a",
        "mdl_a 90 (90%), mdl_b 10 (10%)",
        "x 1 (33.3%), y 2 (66.7%)",
        "",
    ]
    assert out["targets"] == [
        "–",
        "mdl_a 90 (90%), mdl_b 10 (10%); shadow mdl_c",
        "mdl_a",
    ]
    assert out["history"] == [
        "3",
        "rolled back",
        "key_x",
        "mdl_a 90 (90%), mdl_b 10 (10%)",
        "mdl_a",
    ]
    assert out["created"] == ["1", "created", "–", "–", "mdl_a"]
    # One column per model; the weight's share is of the targets' weights; p95 above the last
    # latency bucket reads "> 10 s"; agreement only where a shadow compared something.
    assert out["rows"] == [
        ["Role", "target", "target", "shadow", "shadow"],
        ["Weight", "90 (90%)", "10 (10%)", "–", "–"],
        ["Requests", "9", "0", "8", "0"],
        ["Errors", "1", "0", "0", "0"],
        ["Images", "8", "0", "8", "0"],
        ["Mean latency", "12.3 ms", "–", "4.0 ms", "–"],
        ["p50 latency", "≤ 25 ms", "–", "≤ 5 ms", "–"],
        ["p95 latency", "> 10 s", "–", "≤ 10 ms", "–"],
        ["Shadow agreement", "–", "–", "87.5% (7 of 8 images)", "–"],
    ]
    # Most frequent first, then by name ("1" is not put first by the object's key order).
    assert out["top"] == [
        [{"label": "ant", "count": 5, "share": 5 / 9}, {"label": "1", "count": 2, "share": 2 / 9}],
        [],
        [{"label": "ant", "count": 8, "share": 1}],
        [],
    ]
    weights_error = {"error": "Weights: whole numbers from 1 to 10000."}
    assert out["changes"] == [
        {"body": {"model_id": "mdl_a"}},
        {
            "body": {
                "targets": [
                    {"model_id": "mdl_a", "weight": 90},
                    {"model_id": "mdl_b", "weight": 10},
                ]
            }
        },
        {
            "body": {
                "targets": [{"model_id": "mdl_a", "weight": 3}, {"model_id": "mdl_b", "weight": 1}]
            }
        },
        {"error": "Choose the model it should serve."},
        {"error": "A split needs two different models."},
        weights_error,
        weights_error,
        weights_error,
        weights_error,
    ]
    name_error = {
        "error": "Name: lower-case letters, digits and hyphens (a DNS label: at most 63, no "
        "hyphen first or last)."
    }
    assert out["creates"] == [
        {"body": {"name": "pets", "model_id": "mdl_a"}},
        name_error,
        name_error,
        name_error,
        {"body": {"name": "a" * 63, "model_id": "mdl_a"}},
        name_error,
        {"error": "Choose the model it should serve (train or publish one first)."},
    ]


# -- the page's flows, run by node against the real server -------------------------------------


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


def _to_fixed(value: float, digits: int) -> str:
    """JavaScript's value.toFixed(digits): an exact tie goes away from zero (Python's format
    rounds it to even: 81.25 -> "81.2" where JavaScript writes "81.3")."""
    step = Decimal(1).scaleb(-digits)
    return str(Decimal(value).quantize(step, rounding=ROUND_HALF_UP))


def _format_number(value: float, digits: int) -> str:
    """app.js's formatNumber: toExponential(2) below 1e-3, else toFixed(digits)."""
    if value != 0 and abs(value) < 1e-3:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return _to_fixed(value, digits)


def _js_percent(share: float) -> str:
    """`${share * 100}%` as JavaScript writes it (100, not 100.0)."""
    value = share * 100
    return f"{int(value)}%" if value.is_integer() else f"{value!r}%"


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
