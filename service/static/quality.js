// How good a model is, from its validation metrics (GET /v1/models/{id}: accuracy, macro-F1,
// per-class precision/recall/F1, the confusion matrix), and two models side by side. Builds
// elements only (app.js fetches); styles come from style.css classes, and the few values that
// vary per cell (a bar's length, a cell's share) are set through element.style, which the
// page's Content-Security-Policy allows (style attributes in markup it would block).
// The pure parts are loaded by node in tests/integration/test_ui.py.
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

if (typeof module !== "undefined" && module.exports) {
  module.exports = { rowShares, compareSummary, compareF1, hasValidation };
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

function perClassTable(model) {
  const { table, body } = qualityTable("Per class, on the validation images", "per-class", ["Class", "Images", "Precision", "Recall", "F1"]);
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
