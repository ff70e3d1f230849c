"""The views' pure parts, run with node when it is installed (no browser is needed): the
training curves' data (curves.js), the model view's and evaluations' figures (quality.js) and
the deployments section (deployments.js).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.integration.ui_helpers import CURVES_JS, DEPLOYMENTS_JS, QUALITY_JS, _node

pytestmark = pytest.mark.integration

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
