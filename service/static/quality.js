// How good a model is, from its validation metrics (GET /v1/models/{id}: accuracy, macro-F1,
// per-class precision/recall/F1, the confusion matrix), two models side by side, and one of its
// evaluations on another dataset (GET /v1/evaluations/{id}: the same figures, top-k accuracy,
// the most confused pairs and the worst-scored examples, whose thumbnails app.js fetches), and a
// batch prediction's status and file name. Builds
// elements only (app.js fetches); styles come from style.css classes, and the few values that
// vary per cell (a bar's length, a cell's share) are set through element.style, which the
// page's Content-Security-Policy allows (style attributes in markup it would block).
// The pure parts are loaded by node in tests/integration/test_ui_views.py.
"use strict";

const qualityPercent = (v) => (typeof v === "number" && Number.isFinite(v) ? `${(100 * v).toFixed(1)}%` : "–");
const qualityScore = (v) => (typeof v === "number" && Number.isFinite(v) ? v.toFixed(3) : "–");

// counts[true][predicted] divided by each row's total: the share of a class's validation images
// given each label (a class without validation images: a row of zeros).
function rowShares(matrix) {
  return matrix.map((row) => {
    const total = row.reduce((a, b) => a + b, 0);
    return row.map((count) => (total ? count / total : 0));
  });
}

// The models' figures side by side: [what, first, second] texts.
function compareSummary(a, b) {
  const m = (model) => model.metrics || {};
  const rows = [
    ["Base model", a.base_model, b.base_model],
    ["Accuracy", qualityPercent(m(a).accuracy), qualityPercent(m(b).accuracy)],
    ["Macro-F1", qualityScore(m(a).macro_f1), qualityScore(m(b).macro_f1)],
    ["Validation loss", qualityScore(m(a).loss), qualityScore(m(b).loss)],
    ["Validation images", String(m(a).num_examples ?? "–"), String(m(b).num_examples ?? "–")],
  ];
  return rows;
}

// Per-class F1 of both models over all their labels (the first model's order, then the second's
// own); null where a model has no such class.
function compareF1(a, b) {
  const f1s = (model) => new Map(((model.metrics || {}).per_class || []).map((c) => [c.label, c.f1]));
  const fa = f1s(a);
  const fb = f1s(b);
  const labels = [...fa.keys(), ...[...fb.keys()].filter((l) => !fa.has(l))];
  return labels.map((label) => ({ label, a: fa.has(label) ? fa.get(label) : null, b: fb.has(label) ? fb.get(label) : null }));
}

function hasValidation(model) {
  const m = model.metrics || {};
  return typeof m.accuracy === "number" && Array.isArray(m.confusion_matrix) && m.confusion_matrix.length > 0;
}

// An evaluation's result in the shape the model view draws (the figures sit where a model's
// validation metrics do), so the per-class bars and the confusion matrix are drawn alike.
function evaluationAsModel(evaluation) {
  const result = evaluation.result || {};
  return { id: evaluation.id, classes: result.classes || [], metrics: result };
}

// An evaluation's status in a few words: "queued", "running, 40 / 120 images",
// "failed: unknown_labels", "succeeded".
function evaluationStatus(evaluation) {
  const p = evaluation.progress || {};
  if (evaluation.status === "running" && Number.isFinite(p.done)) {
    return `running, ${p.done} / ${Number.isFinite(p.total) ? p.total : "?"} images`;
  }
  if (evaluation.status === "failed") return `failed: ${evaluation.error ? evaluation.error.code : "unknown"}`;
  return evaluation.status;
}

// What an evaluation scored: the job's held-back validation images, or a dataset.
function evaluationSource(evaluation) {
  if (evaluation.source === "validation") return "validation images (at training)";
  return evaluation.dataset_id ? `dataset ${evaluation.dataset_id}` : "a deleted dataset";
}

// The summary of a succeeded evaluation: [what, value] texts, top-k accuracies included (the
// API measures those not above the number of classes; the validation run measures none).
function evaluationFigures(result) {
  const rows = [
    ["Accuracy", qualityPercent(result.accuracy)],
    ["Macro-F1", qualityScore(result.macro_f1)],
  ];
  const topK = result.top_k_accuracy || {};
  for (const k of Object.keys(topK).sort((a, b) => Number(a) - Number(b))) {
    if (k !== "1") rows.push([`Top-${k} accuracy`, qualityPercent(topK[k])]);
  }
  if (!result.top_k_accuracy) rows.push(["Top-k accuracy", "not measured (validation at training scores top-1 only)"]);
  rows.push(["Images", String(result.num_examples ?? "–")]);
  if (result.skipped) rows.push(["Skipped (could not be decoded)", String(result.skipped)]);
  rows.push(["Loss", qualityScore(result.loss)]);
  return rows;
}

// A batch prediction's status in a few words: "queued", "running, shard 2 / 5, 128 / 300 images",
// "failed: dataset_failed", "succeeded, 300 rows (2 errors)".
function batchStatus(batch) {
  const p = batch.progress || {};
  const of = (done, total) => `${done || 0} / ${Number.isFinite(total) ? total : "?"}`;
  if ((batch.status === "running" || batch.status === "cancelling") && Number.isFinite(p.shards_total)) {
    return `${batch.status}, shard ${of(p.shards_done, p.shards_total)}, ${of(p.images_done, p.images_total)} images`;
  }
  if (batch.status === "failed") return `failed: ${batch.error ? batch.error.code : "unknown"}`;
  if (batch.status === "succeeded" && batch.result) {
    const { rows, errors } = batch.result;
    const tail = errors ? ` (${errors} error${errors === 1 ? "" : "s"})` : "";
    return `succeeded, ${rows} row${rows === 1 ? "" : "s"}${tail}`;
  }
  return batch.status;
}

// The downloaded file's name: the one the output's Content-Disposition gives.
function batchFileName(batch) {
  return `${batch.id}-predictions.${batch.format === "jsonl" ? "jsonl" : "csv"}`;
}

if (typeof module !== "undefined" && module.exports) {
  module.exports = {
    rowShares, compareSummary, compareF1, hasValidation, evaluationAsModel, evaluationStatus,
    evaluationSource, evaluationFigures, batchStatus, batchFileName,
  };
}

// -- elements --------------------------------------------------------------------------------------

function qualityEl(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (className) node.className = className;
  return node;
}

// A horizontal bar of length `value` (0..1) and the number beside it.
function qualityBar(value, kind) {
  const wrap = qualityEl("span", null, "bar-cell");
  const track = qualityEl("span", null, `bar ${kind}`);
  const fill = qualityEl("span", null, "bar-fill");
  fill.style.width = `${Math.max(0, Math.min(1, value || 0)) * 100}%`;
  track.appendChild(fill);
  wrap.append(track, qualityEl("span", qualityScore(value), "bar-value"));
  return wrap;
}

function qualityHeaderRow(names) {
  const row = document.createElement("tr");
  for (const name of names) {
    const th = qualityEl("th", name);
    th.scope = "col";
    row.appendChild(th);
  }
  return row;
}

function qualityTable(caption, className, header) {
  const table = qualityEl("table", null, className);
  table.createCaption().textContent = caption;
  const head = document.createElement("thead");
  head.appendChild(qualityHeaderRow(header));
  const body = document.createElement("tbody");
  table.append(head, body);
  return { table, body };
}

function qualityRowHeader(row, text) {
  const th = qualityEl("th", text);
  th.scope = "row";
  row.appendChild(th);
}

function qualitySummary(model) {
  const m = model.metrics || {};
  const list = qualityEl("dl", null, "quality-summary");
  const items = [
    ["Accuracy", qualityPercent(m.accuracy)],
    ["Macro-F1", qualityScore(m.macro_f1)],
    ["Validation images", String(m.num_examples ?? "–")],
    ["Validation loss", qualityScore(m.loss)],
  ];
  if (m.precision) items.push(["Served in", `${m.precision.served}: ${m.precision.reason}`]);
  for (const [k, v] of items) list.append(qualityEl("dt", k), qualityEl("dd", v));
  return list;
}

function perClassTable(model, caption = "Per class, on the validation images") {
  const { table, body } = qualityTable(caption, "per-class", ["Class", "Images", "Precision", "Recall", "F1"]);
  for (const c of model.metrics.per_class) {
    const row = body.insertRow();
    qualityRowHeader(row, c.label);
    row.appendChild(qualityEl("td", String(c.support)));
    for (const kind of ["precision", "recall", "f1"]) {
      const td = document.createElement("td");
      td.appendChild(qualityBar(c[kind], kind));
      row.appendChild(td);
    }
  }
  return table;
}

// Rows: the true class; columns: the predicted one; each cell its count, shaded by the share of
// its row (--share, read by style.css).
function confusionTable(model, caption) {
  const classes = model.classes;
  const matrix = model.metrics.confusion_matrix;
  const shares = rowShares(matrix);
  const { table, body } = qualityTable(caption, "confusion", ["true ↓ / predicted →", ...classes]);
  matrix.forEach((counts, t) => {
    const row = body.insertRow();
    qualityRowHeader(row, classes[t]);
    const total = counts.reduce((x, y) => x + y, 0);
    counts.forEach((count, p) => {
      const td = qualityEl("td", String(count), t === p ? "cm diag" : "cm");
      const share = shares[t][p];
      td.style.setProperty("--share", share.toFixed(3));
      if (share >= 0.6) td.classList.add("strong"); // light text where the shade is dark
      td.title = `${count} of ${total} ${classes[t]} images predicted as ${classes[p]} (${qualityPercent(share)})`;
      row.appendChild(td);
    });
  });
  return table;
}

function noValidation(model) {
  return qualityEl("p", `Model ${model.id} has no validation metrics: it was trained without a validation split (validation fraction 0).`, "hint");
}

// One model: its figures, per-class bars and confusion matrix.
function qualityView(model) {
  const title = qualityEl("h3", `Model ${model.id} (${model.base_model}, ${model.classes.length} classes)`);
  if (!hasValidation(model)) return [title, noValidation(model)];
  const matrix = confusionTable(model, "Confusion matrix: rows are the true class, columns the predicted one; shade: share of the row");
  return [title, qualitySummary(model), perClassTable(model), matrix];
}

// Two models: their figures and per-class F1 next to each other, then both confusion matrices.
function comparisonView(a, b) {
  const title = qualityEl("h3", `Model ${a.id} and model ${b.id}`);
  const summary = qualityTable("Side by side", "compare-summary", ["", a.id, b.id]);
  for (const [what, x, y] of compareSummary(a, b)) {
    const row = summary.body.insertRow();
    qualityRowHeader(row, what);
    row.append(qualityEl("td", x), qualityEl("td", y));
  }
  const f1 = qualityTable("F1 per class", "compare-f1", ["Class", a.id, b.id]);
  for (const c of compareF1(a, b)) {
    const row = f1.body.insertRow();
    qualityRowHeader(row, c.label);
    for (const [v, kind] of [[c.a, "f1"], [c.b, "f1-b"]]) {
      const td = document.createElement("td");
      td.appendChild(v === null ? qualityEl("span", "no such class", "hint") : qualityBar(v, kind));
      row.appendChild(td);
    }
  }
  const both = qualityEl("div", null, "side-by-side");
  for (const model of [a, b]) {
    const box = qualityEl("div", null, "side");
    box.appendChild(hasValidation(model) ? confusionTable(model, `Confusion matrix of ${model.id} (rows: true, columns: predicted)`) : noValidation(model));
    both.appendChild(box);
  }
  return [title, summary.table, f1.table, both];
}

// The most confused pairs of an evaluation, largest first: true class, predicted class, images.
function confusedTable(result) {
  const { table, body } = qualityTable("Most confused: true class given the wrong label", "confused", ["True class", "Predicted as", "Images"]);
  for (const pair of result.most_confused || []) {
    const row = body.insertRow();
    qualityRowHeader(row, pair.label);
    row.append(qualityEl("td", pair.predicted), qualityEl("td", String(pair.count)));
  }
  return table;
}

// The worst-scored examples (the lowest probability for their true class first), each a figure
// whose <img> app.js fills with the fetched thumbnail. Returns {gallery, images}.
function worstGallery(result) {
  const gallery = qualityEl("div", null, "worst");
  const images = [];
  for (const w of result.worst || []) {
    const figure = document.createElement("figure");
    const img = qualityEl("img", null, "thumb");
    img.alt = `${w.path}: a ${w.label} image predicted ${w.predicted}`;
    const caption = qualityEl("figcaption");
    const right = w.predicted === w.label;
    caption.append(
      qualityEl("span", w.path, "path"),
      qualityEl("span", `true ${w.label} ${qualityPercent(w.label_score)}`),
      right
        ? qualityEl("span", "predicted right", "right")
        : qualityEl("span", `predicted ${w.predicted} ${qualityPercent(w.predicted_score)}`, "wrong"),
    );
    figure.append(img, caption);
    gallery.appendChild(figure);
    images.push(img);
  }
  return { gallery, images };
}

// One evaluation: title, figures (top-k included), per-class bars, confusion matrix, most
// confused pairs, worst examples. Returns {nodes, images} (the thumbnails' <img>s, in the order
// of result.worst).
function evaluationView(evaluation) {
  const result = evaluation.result;
  const title = qualityEl("h4", `Evaluation ${evaluation.id} of model ${evaluation.model_id} on ${evaluationSource(evaluation)}`);
  const list = qualityEl("dl", null, "quality-summary evaluation-summary");
  for (const [k, v] of evaluationFigures(result)) list.append(qualityEl("dt", k), qualityEl("dd", v));
  const model = evaluationAsModel(evaluation);
  const nodes = [title, list, perClassTable(model, "Per class, on the evaluated images")];
  nodes.push(confusionTable(model, "Confusion matrix of the evaluation: rows are the true class, columns the predicted one"));
  nodes.push((result.most_confused || []).length ? confusedTable(result) : qualityEl("p", "No image was given a wrong label.", "hint"));
  const { gallery, images } = worstGallery(result);
  if (images.length) {
    nodes.push(qualityEl("h5", "Worst-scored examples: the lowest probability for their true class first"), gallery);
  }
  return { nodes, images };
}
