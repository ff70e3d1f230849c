// Drives service/static/app.js in node against a REAL bitserve server, through the page's own
// event handlers: init, upload + follow its ingestion (SSE), plan, start + follow (SSE) + cancel a
// job, predict; with badZip, an upload that ingestion refuses.
// The browser is replaced by the smallest DOM app.js needs: elements are plain objects, and only
// the ids index.html really has exist (getElementById throws for any other). curves.js and
// quality.js are run as the browser runs them (classic scripts sharing one global scope), and
// uPlot by a stand-in that records what the page gave it (tests/integration/test_ui_browser.py
// draws with the real one, in a real browser).
// argv: app.js path, JSON {base, tags: {id: tagName}, hash (the URL fragment the page opens
// with, e.g. "#key=bsk_..."), zip, png, badZip (optional: an archive ingestion refuses),
// overrides, scenario: "cancel" (needs modelId: a model
// to predict with, and compareId: a second model to compare it with), "train" (needs a worker), "key" (a server that needs a key, opened without
// one: needs predictKey and adminKey) or "open" (a server without API keys)}. Prints JSON.
"use strict";

const fs = require("fs");
const path = require("path");
const vm = require("vm");
const [appPath, argJson] = process.argv.slice(2);
const args = JSON.parse(argJson);

class El {
  constructor(tag, id) {
    this.tagName = tag.toUpperCase();
    this.id = id || "";
    this.children = [];
    this.textContent = "";
    this.hidden = false;
    this.disabled = false;
    this.files = [];
    this.attrs = {};
    this.listeners = {};
    this.classList = { add() {}, remove() {} };
    this.style = { props: {}, setProperty(k, v) { this.props[k] = v; } };
    this._value = "";
  }
  get value() {
    if (this.tagName !== "SELECT") return this._value;
    const values = this.children.map((o) => o.value);
    return values.includes(this._value) ? this._value : values[0] || "";
  }
  set value(v) { this._value = String(v); }
  get tBodies() { return [(this._tbody ||= new El("tbody"))]; }
  get cells() { return this.children; }
  addEventListener(type, fn) { (this.listeners[type] ||= []).push(fn); }
  fire(type, event = {}) {
    for (const fn of this.listeners[type] || []) fn({ preventDefault() {}, target: this, ...event });
  }
  appendChild(child) { this.children.push(child); return child; }
  append(...children) { this.children.push(...children); }
  replaceChildren(...children) { this.children = children; }
  setAttribute(k, v) { this.attrs[k] = v; }
  insertRow() { return this.appendChild(new El("tr")); }
  createCaption() { return (this._caption ||= new El("caption")); }
  click() {}
  focus() { focused = this.id; }
}

const text = (node) =>
  typeof node === "string" ? node : [node.textContent, ...(node._caption ? [text(node._caption)] : []),
    ...node.children.map(text)].join("");
const rows = (id) => document.getElementById(id).tBodies[0].children.map((r) => r.children.map(text));

const elements = new Map(Object.entries(args.tags).map(([id, tag]) => [id, new El(tag, id)]));
// Every text the upload status line showed, in order (a phase may last less than a poll of
// waitFor): "Uploading ...", "Processing ...", then the outcome.
const uploadHistory = [];
if (elements.has("upload-status")) {
  let current = "";
  Object.defineProperty(elements.get("upload-status"), "textContent", {
    get: () => current,
    set: (v) => {
      current = String(v);
      if (uploadHistory[uploadHistory.length - 1] !== current) uploadHistory.push(current);
    },
  });
}
let ready = null;
let focused = null;
const stored = new Map();
const replaced = []; // URLs given to history.replaceState
const location = { origin: args.base, pathname: "/", search: "", hash: args.hash || "" };
global.document = {
  getElementById(id) {
    if (!elements.has(id)) throw new Error(`app.js looked up #${id}, which index.html lacks`);
    return elements.get(id);
  },
  createElement: (tag) => new El(tag),
  querySelector(selector) {
    if (selector !== "#jobs-list tbody tr") throw new Error(`unexpected selector ${selector}`);
    return document.getElementById("jobs-list").tBodies[0].children[0] || null;
  },
  addEventListener(type, fn) { if (type === "DOMContentLoaded") ready = fn; },
};
global.window = {
  location,
  history: {
    state: null,
    replaceState(_state, _title, url) {
      replaced.push(url);
      const u = new URL(url, args.base);
      Object.assign(location, { pathname: u.pathname, search: u.search, hash: u.hash });
    },
  },
  localStorage: {
    getItem: (k) => (stored.has(k) ? stored.get(k) : null),
    setItem: (k, v) => stored.set(k, String(v)),
    removeItem: (k) => stored.delete(k),
  },
  addEventListener() {},
  confirm: () => true,
  getComputedStyle: () => ({ getPropertyValue: () => "" }),
};

// uPlot's stand-in: each chart's options, its latest data, and what its draw hook drew.
const plots = [];
global.uPlot = class {
  constructor(opts, data, target) {
    this.opts = opts;
    this.data = data;
    this.target = target;
    this.setDataCalls = 0;
    this.destroyed = false;
    this.bbox = { left: 0, top: 0, width: 1e9, height: 100 };
    this.drawn = [];
    const drawn = this.drawn;
    let lineAt = null; // the x of the last line drawn: the marker's step (valToPos is the identity)
    this.ctx = {
      save() {}, restore() {}, beginPath() {}, lineTo() {}, stroke() {}, setLineDash() {},
      moveTo(x) { lineAt = x; },
      fillText(label) { drawn.push([label, lineAt]); },
    };
    plots.push(this);
    this.redraw();
  }
  valToPos(v) { return v; }
  redraw() {
    this.drawn.length = 0;
    for (const plugin of this.opts.plugins || []) for (const hook of plugin.hooks.draw || []) hook(this);
  }
  setData(data) { this.data = data; this.setDataCalls += 1; this.redraw(); }
  setSize() {}
  destroy() { this.destroyed = true; }
};
uPlot.pxRatio = 1;
global.getComputedStyle = window.getComputedStyle;
for (const name of ["curves.js", "quality.js"]) {
  const file = path.join(path.dirname(appPath), name);
  vm.runInThisContext(fs.readFileSync(file, "utf8"), { filename: file });
}
const $ = (id) => document.getElementById(id);
// Requests in flight (until their headers): the page's async work is done when this is 0.
let inflight = 0;
const sentKeys = new Set(); // the Authorization headers the page sent
const realFetch = global.fetch;
global.fetch = async (...a) => {
  sentKeys.add((a[1] && a[1].headers && a[1].headers.Authorization) || "");
  inflight += 1;
  try {
    return await realFetch(...a);
  } finally {
    inflight -= 1;
  }
};
const settled = async () => {
  for (let calm = 0; calm < 3; ) {
    await new Promise((r) => setTimeout(r, 30));
    calm = inflight === 0 ? calm + 1 : 0;
  }
};

async function waitFor(what, cond, ms = 20000, errorsExpected = false) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return;
    if (!errorsExpected && !$("error").hidden) throw new Error(`${what}: the page shows an error: ${$("error").textContent}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`${what}: not reached in ${ms} ms`);
}

const shown = (id) => ($(id).hidden ? null : $(id).textContent);

// What the job panel's charts hold: the live ones (not destroyed), as {title, series, data, markers}.
const charts = () => plots.filter((p) => !p.destroyed).map((p) => ({
  title: p.opts.title,
  series: p.opts.series.map((s) => s.label),
  data: p.data,
  markers: p.drawn,
}));
// The tables of the model view: class, caption, header and rows of cell texts; a confusion
// matrix's cells also with their --share.
const find = (node, pred, out = []) => {
  if (typeof node === "string") return out;
  if (pred(node)) out.push(node);
  for (const c of node.children) find(c, pred, out);
  return out;
};
const viewTables = () => find($("quality-output"), (n) => n.tagName === "TABLE").map((table) => {
  const body = table.children.find((c) => c.tagName === "TBODY");
  const out = {
    className: table.className,
    caption: text(table._caption),
    head: text(table.children.find((c) => c.tagName === "THEAD")),
    rows: body.children.map((r) => r.children.map(text)),
  };
  if (table.className === "confusion") {
    out.shares = body.children.map((r) => r.children.filter((c) => c.tagName === "TD").map((c) => c.style.props["--share"]));
  }
  return out;
});

// A server that needs a key, a page without one: the 401 opens the key panel; a key without
// the scope the lists need says which scope is missing; the right key loads everything.
async function keyScenario(out) {
  ready();
  await waitFor("the key panel", () => $("settings").open === true, 20000, true);
  await settled();
  out.panel = { open: $("settings").open, focused, help: $("api-key-help").textContent, error: shown("error") };
  $("api-key").value = args.predictKey;
  $("api-key").fire("change");
  await waitFor("a 403", () => /insufficient_scope/.test($("error").textContent), 20000, true);
  await settled();
  out.forbidden = shown("error");
  $("api-key").value = args.adminKey;
  $("api-key").fire("change");
  await waitFor("the page with a key", () => $("base-model").children.length > 0 && $("error").hidden);
  await settled();
  out.error = shown("error");
  out.stored = stored.get("bitserve-api-key") || null;
  $("forget-key").fire("click");
  out.forgotten = { stored: stored.get("bitserve-api-key") || null, input: $("api-key").value, focused };
}

async function main() {
  // app.js and deployments.js (which calls app.js's api() and $()) as the browser runs them:
  // classic scripts in the one global scope, after curves.js and quality.js.
  for (const file of [appPath, path.join(path.dirname(appPath), "deployments.js")]) {
    vm.runInThisContext(fs.readFileSync(file, "utf8"), { filename: file });
  }
  const out = {};
  if (args.scenario === "key") {
    await keyScenario(out);
    console.log(JSON.stringify(out));
    return;
  }
  ready();
  // What the page did with the URL fragment it opened with.
  out.fragment = { stored: stored.get("bitserve-api-key") || null, hash: location.hash, replaced, input: $("api-key").value };
  await waitFor("base models", () => $("base-model").children.length > 0);
  await settled();
  if (args.scenario === "open") {
    out.baseModels = $("base-model").children.map((o) => o.value);
    out.panelOpen = Boolean($("settings").open);
    out.error = shown("error");
    out.sentKeys = [...sentKeys];
    console.log(JSON.stringify(out));
    return;
  }
  out.baseModels = $("base-model").children.map((o) => o.value);
  out.baseModel = $("base-model").value;

  $("upload-file").files = [new File([fs.readFileSync(args.zip)], "pets.zip", { type: "application/zip" })];
  $("upload-name").value = "page pets";
  $("upload-form").fire("submit");
  await waitFor("upload", () => $("upload-status").textContent.startsWith("Uploaded"), 90000);
  const uploaded = /\((ds_\w+)\)/.exec($("dataset-title").textContent)[1];
  if ($("dataset-select").value !== uploaded) {
    throw new Error(`the upload selected ${$("dataset-select").value}, not ${uploaded}`);
  }
  await settled();
  out.uploadStatus = $("upload-status").textContent;
  out.uploadHistory = [...uploadHistory];
  out.datasetRow = rows("datasets-list").find((r) => r[1] === uploaded);
  out.datasetTitle = $("dataset-title").textContent;
  out.classes = rows("dataset-classes");
  out.rejected = $("dataset-rejected").children.map(text);
  out.datasetId = $("dataset-select").value;

  $("base-model").value = "tiny-R10x0.25";
  for (const [k, v] of Object.entries(args.overrides)) {
    $(`ov-${k}`).value = v;
  }
  $("plan-form").fire("submit");
  await waitFor("plan", () => $("plan-output").children.length === 1);
  const table = $("plan-output").children[0];
  out.planCaption = text(table._caption);
  out.plan = table.children.map((r) => r.children.map(text));

  $("start-job").fire("click");
  if (args.scenario === "train") {
    // A real worker trains it: watch the page's progress read-out until the job succeeds.
    const seen = [];
    await waitFor("job succeeded", () => {
      const step = $("stat-step").textContent;
      if (seen[seen.length - 1] !== step) seen.push(step);
      const status = $("job-status").textContent;
      if (/: (failed|cancelled)/.test(status)) throw new Error(`the job did not succeed: ${status}`);
      return $("job-status").textContent.endsWith(": succeeded") &&
        $("job-result").textContent.startsWith("Model ");
    }, 120000);
    out.steps = seen;
    out.stats = ["stat-loss", "stat-lr", "stat-ips", "stat-eta"].map((id) => $(id).textContent);
    out.progress = [$("job-progress").value, $("job-progress").max];
    out.status = $("job-status").textContent;
    out.result = $("job-result").textContent;
    await settled();
    out.modelSelected = $("model-select").value;
    // The finished job's curves (the metrics endpoint's history) and the new model's view.
    out.charts = charts();
    out.curvesSummary = $("curves-summary").textContent;
    out.curvesShown = !$("job-curves").hidden;
    await waitFor("model view", () => text($("quality-output")).includes(out.modelSelected));
    out.qualityModel = $("quality-model").value;
    out.quality = viewTables();
    out.qualityText = find($("quality-output"), (n) => n.tagName === "DL").map(text);
  } else {
    await waitFor("job queued", () => /^Job job_\w+: queued$/.test($("job-status").textContent) && !$("cancel-job").disabled);
    out.queued = $("job-status").textContent;
    out.progressMax = $("job-progress").max;
    $("cancel-job").fire("click");
    await waitFor("job cancelled", () => $("job-status").textContent.endsWith(": cancelled") &&
      rows("jobs-list").some((r) => r[1] === "cancelled" && out.queued.includes(r[0])));
    out.cancelled = $("job-status").textContent;
    out.cancelDisabled = $("cancel-job").disabled;
    // The charts are redrawn from GET /v1/jobs/{id}/metrics once the job has ended (a fetch
    // that may still be in flight): wait for both, not a fixed moment.
    await waitFor("curves of the ended job", () => charts().length === 2);
    out.cancelCharts = charts();
    out.cancelCurves = $("curves-summary").textContent;

    $("refresh-lists").fire("click");
    await waitFor("model listed", () => $("model-select").children.some((o) => o.value === args.modelId));
    $("model-select").value = args.modelId;
    // The model view: one model, then two side by side.
    $("quality-model").value = args.modelId;
    $("compare-model").value = "";
    $("quality-model").fire("change");
    await waitFor("one model", () => text($("quality-output")).startsWith(`Model ${args.modelId} (`));
    out.single = viewTables();
    out.singleText = find($("quality-output"), (n) => n.tagName === "DL").map(text);
    out.singleBars = find($("quality-output"), (n) => /^bar-fill/.test(n.className)).map((n) => n.style.width);
    $("compare-model").value = args.compareId;
    $("compare-model").fire("change");
    await waitFor("two models", () => text($("quality-output")).startsWith(`Model ${args.modelId} and model ${args.compareId}`));
    out.compared = viewTables();
    out.compareOptions = $("compare-model").children.map((o) => o.value).slice(0, 1);
  }
  $("predict-file").files = [new File([fs.readFileSync(args.png)], "leaf.png", { type: "image/png" })];
  $("predict-file").fire("change");
  await waitFor("prediction", () => $("predict-results").children.length === 1);
  out.prediction = text($("predict-results").children[0]);
  out.error = $("error").hidden ? null : $("error").textContent;
  if (args.badZip) {
    $("upload-file").files = [new File([fs.readFileSync(args.badZip)], "solo.zip", { type: "application/zip" })];
    $("upload-name").value = "page solo";
    $("upload-form").fire("submit");
    await waitFor("failed upload", () => !$("error").hidden, 90000, true);
    await settled();
    out.failed = {
      status: $("upload-status").textContent,
      error: $("error").textContent,
      row: rows("datasets-list").find((r) => r[0] === "page solo"),
      selectable: $("dataset-select").children.some((o) => o.textContent.startsWith("page solo")),
      buttonDisabled: $("upload-button").disabled,
    };
  }
  console.log(JSON.stringify(out));
}

main().catch((err) => {
  console.error(err.stack || String(err));
  process.exit(1);
});
