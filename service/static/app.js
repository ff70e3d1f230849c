// bitserve's page: plain JS, no build step, no external assets. Every request goes through
// api() / apiStream() with a literal path (tests/integration/test_ui_page.py checks each one against
// the app's OpenAPI), so the page can only call routes the server has.
"use strict";

class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details || {};
  }
}

// -- pure helpers (also loaded by node in the tests) --------------------------------------------

// Server-Sent Events, incrementally: feed text chunks as they arrive; complete events go to
// onEvent(name, data). Lines end in \n, \r\n or \r (sse-starlette sends \r\n), and a chunk may
// end between \r and \n, so a trailing \r waits for the next chunk.
class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.event = "";
    this.data = [];
  }

  push(chunk) {
    this.buffer += chunk;
    for (;;) {
      const cr = this.buffer.indexOf("\r");
      const lf = this.buffer.indexOf("\n");
      let end = cr === -1 ? lf : lf === -1 ? cr : Math.min(cr, lf);
      if (end === -1) return;
      let width = 1;
      if (this.buffer[end] === "\r") {
        if (end === this.buffer.length - 1) return; // maybe the \r of a \r\n: wait
        if (this.buffer[end + 1] === "\n") width = 2;
      }
      const line = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + width);
      this.line(line);
    }
  }

  line(line) {
    if (line === "") {
      if (this.data.length) this.onEvent(this.event || "message", this.data.join("\n"));
      this.event = "";
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return; // keep-alive comment
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
  }
}

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = s % 60;
  if (h) return `${h} h ${String(m).padStart(2, "0")} min`;
  if (m) return `${m} min ${String(rest).padStart(2, "0")} s`;
  return `${rest} s`;
}

function formatBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i += 1;
  }
  return `${i ? v.toFixed(1) : v} ${units[i]}`;
}

function formatNumber(v, digits) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  if (v !== 0 && Math.abs(v) < 1e-3) return v.toExponential(2);
  return v.toFixed(digits);
}

// "code: message" plus the details a person can act on (offending classes, invalid fields).
function describeError(err) {
  if (!(err instanceof ApiError)) return `Network or page error: ${err && err.message ? err.message : err}`;
  const lines = [err.status ? `${err.message} (${err.code}, HTTP ${err.status})` : err.message];
  const d = err.details || {};
  if (Array.isArray(d.classes)) {
    lines.push("Classes: " + d.classes.map((c) => `${c.name} (${c.count})`).join(", "));
  }
  if (Array.isArray(d.errors)) {
    for (const e of d.errors) lines.push(`${(e.loc || []).join(".")}: ${e.msg}`);
  }
  if (d.field) lines.push(`Field: ${d.field}`);
  if (d.filename) lines.push(`File: ${d.filename}`);
  if (err.status === 401) lines.push("Enter an API key in the API key panel above.");
  if (err.status === 403 && Array.isArray(d.needed)) {
    const has = Array.isArray(d.scopes) && d.scopes.length ? d.scopes.join(", ") : "none";
    const admin = d.needed.includes("admin") ? "" : " (or admin)";
    lines.push(`Missing scope: this needs a key with ${d.needed.join(" or ")}${admin}; this key has ${has}.`);
  }
  return lines.join("\n");
}

// A dataset's ingestion progress in words: "queued", "extracting 3 / 10", "storing".
function describeIngest(progress) {
  if (!progress) return "processing";
  const counted = Number.isFinite(progress.done) && Number.isFinite(progress.total) && progress.total > 0;
  return counted ? `${progress.phase} ${progress.done} / ${progress.total}` : progress.phase;
}

// A dataset's status for the list: "ready", "processing (indexing 4 / 10)", "failed: too_few_classes".
function datasetStatus(ds) {
  if (ds.status === "processing") return `processing (${describeIngest(ds.progress)})`;
  if (ds.status === "failed") return `failed: ${ds.error ? ds.error.code : "unknown"}`;
  return ds.status;
}

// The key handed over in a URL fragment, "#key=bsk_...", as in the link `bitserve up` prints:
// {key, rest} where rest is the fragment without it ("" when nothing else was in it); null when
// the fragment holds no key.
function keyFromFragment(hash) {
  if (!hash || !hash.startsWith("#")) return null;
  const params = new URLSearchParams(hash.slice(1));
  if (!params.has("key")) return null;
  const key = params.get("key").trim();
  params.delete("key");
  const rest = params.toString();
  return { key, rest: rest ? `#${rest}` : "" };
}

const KEY_HELP =
  "This server needs an API key. `bitserve up` saved an admin key in $BITSERVE_HOME/admin.key " +
  "(./.bitserve/admin.key unless BITSERVE_HOME is set) and printed a one-time link that hands it " +
  "to this page. Paste the key here, or make one for this page with " +
  "`bitserve keys create --tenant NAME --scope train --scope predict`.";

if (typeof module !== "undefined" && module.exports) {
  module.exports = {
    ApiError, SseParser, formatDuration, formatBytes, formatNumber, describeError, keyFromFragment, KEY_HELP,
    describeIngest, datasetStatus,
  };
}

// -- talking to the API --------------------------------------------------------------------------

const seg = encodeURIComponent;
const $ = (id) => document.getElementById(id);

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The key is kept in localStorage, not sessionStorage, on purpose: `bitserve up` prints its
// sign-in link once, so a key that died with the tab would send people digging for admin.key
// each time. sessionStorage would not stop the one real threat either: a script running in this
// origin reads both. That is what the Content-Security-Policy ('self' only, no inline script,
// nothing from elsewhere) guards against. The admin key already sits on this machine's disk in
// admin.key; on a shared computer, "Forget key" removes it from the browser.
const KEY_STORE = "bitserve-api-key";

function saveKey(key) {
  if (key) window.localStorage.setItem(KEY_STORE, key);
  else window.localStorage.removeItem(KEY_STORE);
}

// A key in the URL fragment (never sent to the server) is stored, and the fragment removed at
// once, so the key stays neither in the address bar nor in this page's history entry.
function takeKeyFromFragment() {
  const found = keyFromFragment(window.location.hash);
  if (!found) return null;
  const url = window.location.pathname + window.location.search + found.rest;
  window.history.replaceState(window.history.state, "", url);
  if (found.key) saveKey(found.key);
  return found.key || null;
}

// A 401: open the API key panel, say plainly what is needed and where the key is, focus it.
function askForKey(err) {
  const refused = err.code === "invalid_api_key" ? `The key in this page was refused: ${err.message}. ` : "";
  $("api-key-help").textContent = refused + KEY_HELP;
  $("settings").open = true;
  $("api-key").focus();
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  const e = body && body.error;
  if (e && typeof e.code === "string") return new ApiError(response.status, e.code, e.message || "", e.details);
  return new ApiError(response.status, `http_${response.status}`, response.statusText || "request failed", {});
}

async function api(method, path, opts = {}) {
  const url = new URL(path, window.location.origin);
  for (const [k, v] of Object.entries(opts.query || {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  const headers = { Accept: "application/json", ...authHeaders(), ...(opts.headers || {}) };
  let body;
  if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(opts.json);
  } else if (opts.form) {
    body = opts.form; // the browser sets the multipart boundary
  }
  const response = await fetch(url, { method, headers, body, signal: opts.signal });
  if (!response.ok) throw await errorFrom(response);
  if (opts.raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

// A streamed GET (Server-Sent Events); fetch rather than EventSource so the API key header goes too.
async function apiStream(method, path, signal) {
  const response = await fetch(path, {
    method,
    headers: { Accept: "text/event-stream", ...authHeaders() },
    signal,
  });
  if (!response.ok) throw await errorFrom(response);
  return response;
}

// -- page state and rendering --------------------------------------------------------------------

// curves: the followed job's CurveStore (curves.js); chart: its TrainingCurves; quality: the
// number of the latest model view asked for (an older answer arriving later is dropped);
// evaluations, evaluationView: the same for the evaluations list and the evaluation shown;
// evaluating: the id of the evaluation this page follows; shown: the evaluation shown;
// thumbnails: its blob: URLs (revoked when it goes); batches: the number of the latest batch
// predictions list asked for; batching: the id of the batch prediction this page follows;
// offered: the one the download link is for, batchUrl: that link's blob: URL, batchOffer: the
// number of the latest link asked for.
const state = {
  follow: null, jobId: null, baseModels: [], ingest: null, curves: null, chart: null, quality: 0,
  evaluations: 0, evaluationView: 0, evaluating: null, shown: null, thumbnails: [],
  batches: 0, batching: null, offered: null, batchUrl: null, batchOffer: 0,
};

function showError(err) {
  const box = $("error");
  box.textContent = describeError(err);
  box.hidden = false;
  if (err instanceof ApiError && err.status === 401) askForKey(err);
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function guarded(fn) {
  clearError();
  try {
    await fn();
  } catch (err) {
    if (err && err.name === "AbortError") return;
    showError(err);
  }
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function button(label, onClick, title) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (title) b.setAttribute("aria-label", title);
  b.addEventListener("click", () => guarded(onClick));
  return b;
}

function setOptions(select, items, label, keep) {
  const previous = keep || select.value;
  select.replaceChildren();
  for (const item of items) {
    const option = document.createElement("option");
    option.value = item.id;
    option.textContent = label(item);
    select.appendChild(option);
  }
  if (previous && items.some((i) => i.id === previous)) select.value = previous;
}

function showDataset(ds) {
  $("dataset-summary").hidden = false;
  $("dataset-title").textContent = `${ds.name} (${ds.id}): ${ds.num_images} images, ${ds.num_classes} classes, ` +
    `median ${ds.image_size.median_width}×${ds.image_size.median_height} px, ${formatBytes(ds.bytes)}`;
  const body = $("dataset-classes").tBodies[0];
  body.replaceChildren();
  for (const c of ds.classes) {
    const row = body.insertRow();
    cell(row, c.name);
    cell(row, String(c.count));
  }
  // The dataset carries the first 100; the count is of them all (GET .../rejected pages them).
  const shown = ds.rejected_count > ds.rejected.length ? `, first ${ds.rejected.length} shown` : "";
  $("dataset-rejected-title").textContent = `Rejected files (${ds.rejected_count}${shown})`;
  const list = $("dataset-rejected");
  list.replaceChildren();
  for (const r of ds.rejected) {
    const li = document.createElement("li");
    li.textContent = `${r.path}: ${r.reason}`;
    list.appendChild(li);
  }
}

async function loadBaseModels() {
  const { items } = await api("GET", `/v1/base-models`);
  state.baseModels = items;
  const select = $("base-model");
  select.replaceChildren();
  for (const m of items) {
    const option = document.createElement("option");
    option.value = m.name;
    let note = m.published ? "" : ", small, trained from scratch";
    if (m.requires_checkpoint && !m.checkpoint_present) note += `, downloads ${formatBytes(m.download_bytes)} first`;
    option.textContent = `${m.name} (${(m.parameters / 1e6).toFixed(1)} M parameters${note})`;
    select.appendChild(option);
  }
  const ready = items.find((m) => m.checkpoint_present) || items.find((m) => !m.requires_checkpoint);
  if (ready) select.value = ready.name;
  showBaseModelInfo();
}

function showBaseModelInfo() {
  const m = state.baseModels.find((i) => i.name === $("base-model").value);
  $("base-model-info").textContent = m ? `${m.description || ""} ${m.upstream ? `Pre-trained on ${m.upstream}.` : ""}` : "";
}

function overrides() {
  const out = {};
  for (const name of ["steps", "batch_size", "base_lr", "crop", "precrop", "mixup_alpha"]) {
    const raw = $(`ov-${name}`).value.trim();
    if (raw !== "") out[name] = Number(raw);
  }
  return out;
}

async function showPlan() {
  const datasetId = $("dataset-select").value;
  if (!datasetId) throw new ApiError(0, "no_dataset", "Upload or pick a dataset first.", {});
  const result = await api("GET", `/v1/datasets/${seg(datasetId)}/plan`, {
    query: { base_model: $("base-model").value, validation_fraction: $("validation-fraction").value, ...overrides() },
  });
  const p = result.plan;
  const e = result.estimate || {};
  const rows = [
    ["Resize, then random crop", `${p.precrop} → ${p.crop} px`],
    ["Batch size", p.micro_batch_size ? `${p.batch_size} (micro-batches of ${p.micro_batch_size})` : p.batch_size],
    ["Steps", `${p.total_steps} (warm-up ${p.warmup_steps}, learning rate ÷10 at ${(p.decay_steps || []).join(", ")})`],
    ["Base learning rate", p.base_lr],
    ["MixUp alpha", p.mixup_alpha],
    ["Training images / images processed", `${e.training_examples} / ${e.images_processed} (${e.epochs} epochs)`],
    ["Overridden", ((p.source || {}).overridden || []).join(", ") || "nothing (BiT-HyperRule)"],
  ];
  const table = document.createElement("table");
  table.id = "plan-table";
  const caption = table.createCaption();
  caption.textContent = `Plan for ${result.base_model}`;
  for (const [k, v] of rows) {
    const row = table.insertRow();
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = k;
    row.appendChild(th);
    cell(row, String(v));
  }
  $("plan-output").replaceChildren(table);
}

function showProgress(p) {
  const total = p.total_steps || 0;
  $("job-progress").max = Math.max(total, 1);
  $("job-progress").value = Math.min(p.step || 0, Math.max(total, 1));
  $("job-progress").textContent = total ? `${Math.round((100 * (p.step || 0)) / total)}%` : "0%";
  $("stat-step").textContent = `${p.step || 0} / ${total}`;
  $("stat-loss").textContent = formatNumber(p.loss, 4);
  // Evaluating and done report 0 images/s and a learning rate of 0: show training's last instead.
  $("stat-lr").textContent = formatNumber(state.curves ? state.curves.lrFor(p) : p.lr, 5);
  $("stat-ips").textContent = formatNumber(state.curves ? state.curves.rateFor(p) : p.images_per_second, 1);
  $("stat-eta").textContent = formatDuration(p.eta_seconds);
}

function showJob(job) {
  const error = job.error ? `: ${job.error.message} (${job.error.code})` : "";
  $("job-status").textContent = `Job ${job.id}: ${job.status}${error}`;
  const active = ["queued", "running"].includes(job.status);
  if (active) state.jobId = job.id; // what the Cancel button cancels
  $("cancel-job").disabled = !active;
  if (state.curves && state.curves.jobId === job.id) {
    state.curves.setPlan(job.plan);
    drawCurves();
  }
  if (job.progress) showProgress(job.progress);
}

// The job panel's charts start over for `jobId` (shown from its first event on).
function openCurves(jobId) {
  state.curves = new CurveStore(jobId);
  state.chart ||= new TrainingCurves($("curves-charts"), $("curves-summary"));
  state.chart.clear();
  $("job-curves").hidden = false;
}

function drawCurves() {
  if (state.curves && state.chart) state.chart.draw(state.curves);
}

// The job's training history as the server kept it (when the panel opens, and when the job has
// ended); the progress events add to it while the job trains. Its failure leaves the chart to
// the events: it is said, not thrown, so following the job goes on.
async function loadJobMetrics(jobId) {
  const store = state.curves;
  try {
    const history = await api("GET", `/v1/jobs/${seg(jobId)}/metrics`);
    if (state.curves !== store) return; // another job was opened meanwhile
    store.setMetrics(history);
    drawCurves();
  } catch (err) {
    if (err.name === "AbortError") return;
    showError(err);
  }
}

function showResult(job) {
  if (job.status === "succeeded" && job.model_id) {
    const acc = job.metrics && typeof job.metrics.accuracy === "number" ? `, validation accuracy ${(100 * job.metrics.accuracy).toFixed(1)}%` : "";
    const check = job.metrics && job.metrics.precision;
    const served = check ? ` Served in ${check.served}: ${check.reason}.` : "";
    $("job-result").textContent = `Model ${job.model_id} is ready${acc}.${served}`;
  } else {
    $("job-result").textContent = "";
  }
}

async function jobFinished(job) {
  showJob(job);
  state.jobId = null;
  await loadJobMetrics(job.id);
  if (job.progress) showProgress(job.progress); // the training rate, now that the history is in
  showResult(job);
  if (job.status === "succeeded" && job.model_id) {
    await refreshLists({ model: job.model_id });
    await showQuality();
  } else {
    await refreshLists();
  }
}

// An ended job from the list: its last read-out, result and curves.
async function openJob(jobId) {
  if (state.follow) state.follow.abort();
  state.jobId = null;
  openCurves(jobId);
  const job = await api("GET", `/v1/jobs/${seg(jobId)}`);
  showJob(job);
  await loadJobMetrics(jobId);
  if (job.progress) showProgress(job.progress);
  showResult(job);
}

async function followJob(jobId) {
  if (state.follow) state.follow.abort();
  const controller = new AbortController();
  state.follow = controller;
  state.jobId = jobId;
  $("job-result").textContent = "";
  openCurves(jobId);
  await loadJobMetrics(jobId);
  if (controller.signal.aborted) return; // another job was opened meanwhile
  let finished = null;
  try {
    const response = await apiStream("GET", `/v1/jobs/${seg(jobId)}/events`, controller.signal);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SseParser((name, text) => {
      const data = JSON.parse(text);
      if (name === "progress") {
        if (state.curves.addProgress(data)) drawCurves();
        showProgress(data);
      } else if (name === "status") showJob(data);
      else if (name === "done") finished = data;
    });
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(value);
    }
    reader.cancel().catch(() => {});
  } catch (err) {
    if (err.name === "AbortError") return;
    // 503: busy; 429 too_many_streams: this key's streams are all taken. Either way, poll.
    if (err instanceof ApiError && err.status !== 503 && err.status !== 429) throw err;
  }
  // The stream ended early (or with `reconnect`) or could not be opened: poll until the end.
  while (!finished && !controller.signal.aborted) {
    const job = await api("GET", `/v1/jobs/${seg(jobId)}`);
    showJob(job);
    if (["succeeded", "failed", "cancelled"].includes(job.status)) finished = job;
    else await new Promise((r) => setTimeout(r, 1000));
  }
  if (finished && !controller.signal.aborted) await jobFinished(finished);
}

// Follow a dataset's ingestion (its event stream, else polling) until it is ready or failed;
// onUpdate(dataset) on every change. Resolves to the ended dataset, or null once aborted.
async function followDataset(datasetId, onUpdate) {
  if (state.ingest) state.ingest.abort();
  const controller = new AbortController();
  state.ingest = controller;
  let current = null;
  let finished = null;
  try {
    const response = await apiStream("GET", `/v1/datasets/${seg(datasetId)}/events`, controller.signal);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SseParser((name, text) => {
      const data = JSON.parse(text);
      if (name === "status") current = data;
      else if (name === "progress" && current) current = { ...current, progress: data };
      else if (name === "done") current = finished = data;
      else return;
      onUpdate(current);
    });
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(value);
    }
    reader.cancel().catch(() => {});
  } catch (err) {
    if (err.name === "AbortError") return null;
    // 503: busy; 429 too_many_streams: this key's streams are all taken. Either way, poll.
    if (err instanceof ApiError && err.status !== 503 && err.status !== 429) throw err;
  }
  // The stream ended early (or with `reconnect`) or could not be opened: poll until the end.
  while (!finished && !controller.signal.aborted) {
    const ds = await api("GET", `/v1/datasets/${seg(datasetId)}`);
    onUpdate(ds);
    if (ds.status !== "processing") finished = ds;
    else await new Promise((r) => setTimeout(r, 1000));
  }
  if (state.ingest === controller) state.ingest = null;
  return controller.signal.aborted ? null : finished;
}

// Upload, then wait for the ingest worker: "processing" with its phase, then the summary of the
// ready dataset, or its error (what refused the archive) for a failed one.
async function uploadDataset(file, name) {
  const form = new FormData();
  form.append("file", file, file.name);
  if (name) form.append("name", name);
  const status = $("upload-status");
  status.textContent = `Uploading ${file.name} (${formatBytes(file.size)})…`;
  const accepted = await api("POST", `/v1/datasets`, { form });
  const processing = (ds) => { status.textContent = `Processing ${ds.name}: ${describeIngest(ds.progress)}…`; };
  processing(accepted);
  await refreshLists();
  const ds = await followDataset(accepted.id, (d) => { if (d.status === "processing") processing(d); });
  if (!ds) return; // another upload took over
  if (ds.status === "ready") {
    showDataset(ds);
    await refreshLists({ dataset: ds.id });
    status.textContent = `Uploaded: ${ds.num_images} images in ${ds.num_classes} classes.`;
    return;
  }
  status.textContent = `Failed: ${ds.name} could not be used.`;
  await refreshLists();
  const e = ds.error || { code: "ingest_failed", message: "the dataset could not be ingested", details: {} };
  throw new ApiError(0, e.code, `Dataset ${ds.name} failed: ${e.message} (${e.code})`, e.details);
}

async function startJob() {
  const datasetId = $("dataset-select").value;
  if (!datasetId) throw new ApiError(0, "no_dataset", "Upload or pick a dataset first.", {});
  const job = await api("POST", `/v1/jobs`, {
    json: {
      dataset_id: datasetId,
      base_model: $("base-model").value,
      validation_fraction: Number($("validation-fraction").value || 0.1),
      serving_precision: $("serving-precision").value || "fp32",
      overrides: overrides(),
    },
    headers: { "Idempotency-Key": `page-${crypto.randomUUID ? crypto.randomUUID() : Date.now()}` },
  });
  showJob(job);
  await refreshLists();
  await followJob(job.id);
}

async function predict(files) {
  const modelId = $("model-select").value;
  if (!modelId) throw new ApiError(0, "no_model", "Train a model first (or pick one).", {});
  const images = Array.from(files).filter((f) => f.size > 0);
  if (!images.length) return;
  const form = new FormData();
  for (const f of images) form.append("files", f, f.name);
  $("predict-results").textContent = "Classifying…";
  const result = await api("POST", `/v1/models/${seg(modelId)}/predict`, { query: { top_k: 5 }, form });
  const out = [];
  result.predictions.forEach((prediction, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = URL.createObjectURL(images[i]);
    img.alt = images[i].name;
    img.addEventListener("load", () => URL.revokeObjectURL(img.src));
    const caption = document.createElement("figcaption");
    const list = document.createElement("ol");
    list.className = "top-k";
    for (const { label, score } of prediction.top_k) {
      const li = document.createElement("li");
      const meter = document.createElement("meter");
      meter.min = 0;
      meter.max = 1;
      meter.value = score;
      meter.setAttribute("aria-label", `${label} score`);
      li.append(`${label} ${(100 * score).toFixed(1)}% `, meter);
      list.appendChild(li);
    }
    caption.append(images[i].name, list);
    figure.append(img, caption);
    out.push(figure);
  });
  $("predict-results").replaceChildren(...out);
}

async function downloadArtifact(modelId) {
  const response = await api("GET", `/v1/models/${seg(modelId)}/artifact`, { raw: true });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = `${modelId}.zip`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// `select`: {dataset, model} ids to select once the lists are in.
async function refreshLists(select = {}) {
  const [datasets, jobs, models] = await Promise.all([
    api("GET", `/v1/datasets`, { query: { limit: 100 } }),
    api("GET", `/v1/jobs`, { query: { limit: 100 } }),
    api("GET", `/v1/models`, { query: { limit: 100 } }),
  ]);
  const when = (t) => (t ? new Date(t).toLocaleString() : "–");

  // Only ready datasets can be planned and trained on; the list below shows every status.
  const ready = datasets.items.filter((d) => d.status === "ready");
  setOptions($("dataset-select"), ready, (d) => `${d.name} (${d.num_images} images, ${d.num_classes} classes)`, select.dataset);
  const classNames = (d) => (d.classes || []).map((c) => c.name).join(", ");
  setOptions($("evaluate-dataset"), ready, (d) => `${d.name} (${d.num_images} images: ${classNames(d)})`, select.dataset);
  setOptions($("batch-dataset"), ready, (d) => `${d.name} (${d.num_images} images)`, select.dataset);
  let body = $("datasets-list").tBodies[0];
  body.replaceChildren();
  for (const d of datasets.items) {
    const row = body.insertRow();
    [d.name, d.id, datasetStatus(d), String(d.num_images), String(d.num_classes), when(d.created_at)].forEach((t) => cell(row, t));
    if (d.status === "failed" && d.error) row.cells[2].title = d.error.message;
    const actions = cell(row, "");
    if (d.status === "ready") {
      actions.append(button("Use", async () => { $("dataset-select").value = d.id; showDataset(d); }, `Use dataset ${d.name}`));
    }
    actions.append(
      button("Delete", async () => {
        if (!window.confirm(`Delete dataset ${d.name}?`)) return;
        await api("DELETE", `/v1/datasets/${seg(d.id)}`);
        await refreshLists();
      }, `Delete dataset ${d.name}`),
    );
  }

  body = $("jobs-list").tBodies[0];
  body.replaceChildren();
  for (const j of jobs.items) {
    const row = body.insertRow();
    const p = j.progress || {};
    [j.id, j.status, j.base_model, `${p.step || 0} / ${p.total_steps || 0}`, when(j.created_at)].forEach((t) => cell(row, t));
    const actions = cell(row, "");
    if (["queued", "running", "cancelling"].includes(j.status)) {
      actions.append(button("Follow", () => followJob(j.id), `Follow job ${j.id}`));
    }
    if (["succeeded", "failed", "cancelled"].includes(j.status)) {
      actions.append(button("Show", () => openJob(j.id), `Show job ${j.id} and its training curves`));
    }
    if (["queued", "running"].includes(j.status)) {
      actions.append(button("Cancel", async () => { showJob(await api("POST", `/v1/jobs/${seg(j.id)}/cancel`)); await refreshLists(); }, `Cancel job ${j.id}`));
    }
  }

  const modelLabel = (m) => `${m.id} (${m.base_model}: ${(m.classes || []).join(", ")})`;
  setOptions($("model-select"), models.items, modelLabel, select.model);
  setOptions($("quality-model"), models.items, modelLabel, select.model);
  setDeploymentModels(models.items); // deployments.js
  // "Compare with" may be nothing: its first option.
  const compare = $("compare-model");
  const compared = compare.value;
  setOptions(compare, [{ id: "", base_model: "" }, ...models.items], (m) => (m.id ? modelLabel(m) : "nothing (one model)"), compared);
  body = $("models-list").tBodies[0];
  body.replaceChildren();
  for (const m of models.items) {
    const row = body.insertRow();
    const acc = m.metrics && typeof m.metrics.accuracy === "number" ? `${(100 * m.metrics.accuracy).toFixed(1)}%` : "–";
    [m.id, m.base_model, (m.classes || []).join(", "), acc, when(m.created_at)].forEach((t) => cell(row, t));
    cell(row, "").append(
      button("Use", async () => { $("model-select").value = m.id; }, `Use model ${m.id}`),
      button("Details", async () => {
        $("quality-model").value = m.id;
        await showQuality();
        $("step-quality").scrollIntoView();
      }, `How good model ${m.id} is`),
      button("Download", () => downloadArtifact(m.id), `Download model ${m.id}`),
      button("Delete", async () => {
        if (!window.confirm(`Delete model ${m.id}?`)) return;
        await api("DELETE", `/v1/models/${seg(m.id)}`);
        await refreshLists();
        await showQuality(); // the view may have shown it
      }, `Delete model ${m.id}`),
    );
  }
}

// The model view: the chosen model's quality, or two models side by side.
async function showQuality() {
  const ticket = ++state.quality;
  const first = $("quality-model").value;
  const second = $("compare-model").value;
  if (!first) {
    $("quality-output").replaceChildren();
    await Promise.all([showEvaluations(null), showBatchPredictions(null)]);
    return;
  }
  const [a, b] = await Promise.all([
    api("GET", `/v1/models/${seg(first)}`),
    second && second !== first ? api("GET", `/v1/models/${seg(second)}`) : null,
  ]);
  if (ticket !== state.quality) return; // the choice changed while these loaded
  $("quality-output").replaceChildren(...(b ? comparisonView(a, b) : qualityView(a)));
  await Promise.all([showEvaluations(first), showBatchPredictions(first)]);
}

// -- evaluations (the model view's second half) ---------------------------------------------------

// The evaluation shown goes (its thumbnails' blob: URLs with it); a view still loading is dropped.
function clearEvaluationView() {
  state.evaluationView += 1;
  for (const url of state.thumbnails) URL.revokeObjectURL(url);
  state.thumbnails = [];
  state.shown = null;
  $("evaluation-output").replaceChildren();
}

// The model's evaluations, newest first (its validation result, made with the model, last).
async function showEvaluations(modelId) {
  const ticket = ++state.evaluations;
  const body = $("evaluations-list").tBodies[0];
  if (!modelId) {
    body.replaceChildren();
    clearEvaluationView();
    return;
  }
  const { items } = await api("GET", `/v1/models/${seg(modelId)}/evaluations`, { query: { limit: 100 } });
  if (ticket !== state.evaluations) return; // another model was chosen meanwhile
  if (state.shown && state.shown.model_id !== modelId) clearEvaluationView();
  const when = (t) => (t ? new Date(t).toLocaleString() : "–");
  body.replaceChildren();
  for (const e of items) {
    const row = body.insertRow();
    const accuracy = e.result ? qualityPercent(e.result.accuracy) : "–";
    [e.id, evaluationSource(e), evaluationStatus(e), accuracy, when(e.created_at)].forEach((t) => cell(row, t));
    const actions = cell(row, "");
    if (e.status === "succeeded") {
      actions.append(button("Show", () => showEvaluation(e), `Show evaluation ${e.id}`));
    } else if (e.status !== "failed" && state.evaluating !== e.id) {
      actions.append(button("Follow", () => followEvaluation(e), `Follow evaluation ${e.id}`));
    } else if (e.error) {
      row.cells[2].title = e.error.message;
    }
  }
}

// One succeeded evaluation: its figures and tables (quality.js), then the worst examples'
// thumbnails, fetched with the page's key and shown through blob: URLs (an <img src> to the API
// would carry no key; the page's CSP allows blob: images for this).
async function showEvaluation(evaluation) {
  clearEvaluationView();
  const ticket = state.evaluationView;
  const { nodes, images } = evaluationView(evaluation);
  state.shown = evaluation;
  $("evaluation-output").replaceChildren(...nodes);
  await Promise.all(images.map(async (img, index) => {
    const response = await api("GET", `/v1/evaluations/${seg(evaluation.id)}/examples/${index}`, {
      raw: true,
      headers: { Accept: "image/jpeg" },
    });
    const blob = await response.blob();
    if (ticket !== state.evaluationView) return; // another view replaced this one
    const url = URL.createObjectURL(blob);
    state.thumbnails.push(url);
    img.src = url;
  }));
}

function showEvaluationProgress(evaluation) {
  $("evaluate-status").textContent = `Evaluation ${evaluation.id}: ${evaluationStatus(evaluation)}`;
  // The count of images scored while it runs (the total once the worker has listed them); once
  // it has succeeded, the result's.
  const result = evaluation.result;
  const p = evaluation.progress || {};
  const scored = result ? result.num_examples + (result.skipped || 0) : p.done || 0;
  const total = Math.max(1, result ? scored : Number.isFinite(p.total) ? p.total : 1);
  const bar = $("evaluate-progress");
  bar.hidden = false;
  bar.max = total;
  bar.value = Math.min(scored, total);
  bar.textContent = `${Math.round((100 * Math.min(scored, total)) / total)}%`;
}

// Poll an evaluation (the API has no event stream for it) until it ends; then the model view's
// list again, and the evaluation itself if it succeeded, or its error.
async function followEvaluation(evaluation) {
  const id = evaluation.id;
  state.evaluating = id;
  $("evaluate-button").disabled = true;
  let current = evaluation;
  try {
    for (;;) {
      showEvaluationProgress(current);
      if (current.status === "succeeded" || current.status === "failed") break;
      await new Promise((r) => setTimeout(r, 1000));
      if (state.evaluating !== id) return; // the page follows another one now
      current = await api("GET", `/v1/evaluations/${seg(id)}`);
    }
  } finally {
    if (state.evaluating === id) {
      state.evaluating = null;
      $("evaluate-button").disabled = false;
    }
  }
  const viewed = $("quality-model").value === current.model_id;
  if (viewed) await showEvaluations(current.model_id);
  if (current.status === "failed") {
    const e = current.error || { code: "evaluation_failed", message: "the evaluation failed", details: {} };
    throw new ApiError(0, e.code, `Evaluation ${id} failed: ${e.message} (${e.code})`, e.details);
  }
  if (viewed) await showEvaluation(current);
}

async function startEvaluation() {
  const modelId = $("quality-model").value;
  const datasetId = $("evaluate-dataset").value;
  if (!modelId) throw new ApiError(0, "no_model", "Train a model first (or pick one).", {});
  if (!datasetId) throw new ApiError(0, "no_dataset", "Upload a labelled dataset to evaluate on first.", {});
  const evaluation = await api("POST", `/v1/models/${seg(modelId)}/evaluations`, { json: { dataset_id: datasetId } });
  // Following marks it followed (no Follow button) before its first wait, so before the list.
  await Promise.all([followEvaluation(evaluation), showEvaluations(modelId)]);
}

// -- batch predictions (the model view's last part) -----------------------------------------------

// The download link goes, its blob: URL revoked; a link still being made is dropped.
function clearBatchDownload() {
  state.batchOffer += 1;
  if (state.batchUrl) URL.revokeObjectURL(state.batchUrl);
  state.batchUrl = null;
  state.offered = null;
  const link = $("batch-download");
  link.href = "#";
  link.removeAttribute("download");
  $("batch-result").hidden = true;
}

// The model's batch predictions, newest first: Download once succeeded, Follow and Cancel while
// they run.
async function showBatchPredictions(modelId) {
  const ticket = ++state.batches;
  const body = $("batch-list").tBodies[0];
  if (state.offered && state.offered.model_id !== modelId) clearBatchDownload();
  if (!modelId) {
    body.replaceChildren();
    return;
  }
  const { items } = await api("GET", `/v1/models/${seg(modelId)}/batch-predictions`, { query: { limit: 100 } });
  if (ticket !== state.batches) return; // another model was chosen meanwhile
  const when = (t) => (t ? new Date(t).toLocaleString() : "–");
  body.replaceChildren();
  for (const b of items) {
    const row = body.insertRow();
    [b.id, b.dataset_id || "a deleted dataset", batchStatus(b), b.format, String(b.top_k), when(b.created_at)].forEach((t) => cell(row, t));
    const actions = cell(row, "");
    if (b.status === "succeeded") {
      actions.append(button("Download", () => downloadBatch(b), `Download batch prediction ${b.id}`));
    } else if (b.status === "queued" || b.status === "running") {
      if (state.batching !== b.id) actions.append(button("Follow", () => followBatch(b), `Follow batch prediction ${b.id}`));
      actions.append(button("Cancel", async () => {
        await api("POST", `/v1/batch-predictions/${seg(b.id)}/cancel`);
        await showBatchPredictions(modelId);
      }, `Cancel batch prediction ${b.id}`));
    } else if (b.error) {
      row.cells[2].title = b.error.message;
    }
  }
}

// A succeeded batch prediction's file, fetched with the page's key (a plain link to the API
// would carry none), as a blob: URL. A link to it with a download name saves it: a download is
// no fetch nor image load, so the page's CSP (img-src blob:, no connect-src blob:) does not
// stand in its way (the browser test downloads through it).
async function batchBlobUrl(batch) {
  const type = batch.format === "jsonl" ? "application/x-ndjson" : "text/csv";
  const response = await api("GET", `/v1/batch-predictions/${seg(batch.id)}/output`, { raw: true, headers: { Accept: type } });
  return URL.createObjectURL(await response.blob());
}

// "Download" in the list: the file saved at once, as a model's download is.
async function downloadBatch(batch) {
  const link = document.createElement("a");
  link.href = await batchBlobUrl(batch);
  link.download = batchFileName(batch);
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// The followed batch prediction succeeded: a link to its file, saved when followed.
async function offerBatchDownload(batch) {
  clearBatchDownload();
  const ticket = state.batchOffer;
  const url = await batchBlobUrl(batch);
  if (ticket !== state.batchOffer) {
    URL.revokeObjectURL(url); // another one replaced it meanwhile
    return;
  }
  state.batchUrl = url;
  state.offered = batch;
  const link = $("batch-download");
  link.href = url;
  link.download = batchFileName(batch);
  link.textContent = `Download ${batchFileName(batch)} (${batch.result.rows} rows, ${formatBytes(batch.result.bytes)})`;
  $("batch-result").hidden = false;
}

function showBatchProgress(batch) {
  $("batch-status").textContent = `Batch prediction ${batch.id}: ${batchStatus(batch)}`;
  // Images done of the dataset's (known once a worker has read it); full once it succeeded.
  const p = batch.progress || {};
  const total = Math.max(1, Number.isFinite(p.images_total) ? p.images_total : 1);
  const done = batch.status === "succeeded" ? total : Math.min(p.images_done || 0, total);
  const bar = $("batch-progress");
  bar.hidden = false;
  bar.max = total;
  bar.value = done;
  bar.textContent = `${Math.round((100 * done) / total)}%`;
}

// Poll a batch prediction (the API has no event stream for it) until it ends; then the list
// again, and the download link if it succeeded, or its error.
async function followBatch(batch) {
  const id = batch.id;
  state.batching = id;
  $("batch-button").disabled = true;
  clearBatchDownload();
  let current = batch;
  try {
    for (;;) {
      showBatchProgress(current);
      if (["succeeded", "failed", "cancelled"].includes(current.status)) break;
      await new Promise((r) => setTimeout(r, 1000));
      if (state.batching !== id) return; // the page follows another one now
      current = await api("GET", `/v1/batch-predictions/${seg(id)}`);
    }
  } finally {
    if (state.batching === id) {
      state.batching = null;
      $("batch-button").disabled = false;
    }
  }
  if ($("quality-model").value === current.model_id) await showBatchPredictions(current.model_id);
  if (current.status === "failed") {
    const e = current.error || { code: "batch_prediction_failed", message: "the batch prediction failed", details: {} };
    throw new ApiError(0, e.code, `Batch prediction ${id} failed: ${e.message} (${e.code})`, e.details);
  }
  if (current.status === "succeeded") await offerBatchDownload(current);
}

async function startBatchPrediction() {
  const modelId = $("quality-model").value;
  const datasetId = $("batch-dataset").value;
  const topK = Number($("batch-top-k").value);
  if (!modelId) throw new ApiError(0, "no_model", "Train a model first (or pick one).", {});
  if (!datasetId) throw new ApiError(0, "no_dataset", "Upload the images to label as a dataset first.", {});
  if (!Number.isInteger(topK) || topK < 1 || topK > 1000) {
    throw new ApiError(0, "invalid_top_k", "Labels per image: a whole number from 1 to 1000.", {});
  }
  const batch = await api("POST", `/v1/models/${seg(modelId)}/batch-predictions`, {
    json: { dataset_id: datasetId, top_k: topK, format: $("batch-format").value },
  });
  // Following marks it followed (no Follow button) before its first wait, so before the list.
  await Promise.all([followBatch(batch), showBatchPredictions(modelId)]);
}

// Everything the page shows, loaded again (on start, and whenever the key changes).
async function loadAll() {
  await Promise.all([loadBaseModels(), refreshLists(), refreshDeployments()]);
  await showQuality();
  const running = document.querySelector("#jobs-list tbody tr");
  if (running && running.cells[1].textContent === "running") await followJob(running.cells[0].textContent);
}

function init() {
  const keyInput = $("api-key");
  takeKeyFromFragment();
  keyInput.value = window.localStorage.getItem(KEY_STORE) || "";
  keyInput.addEventListener("change", () => {
    saveKey(keyInput.value.trim());
    guarded(loadAll);
  });
  $("forget-key").addEventListener("click", () => {
    saveKey("");
    keyInput.value = "";
    keyInput.focus();
  });
  // A sign-in link opened in a tab that already shows the page changes only the fragment.
  window.addEventListener("hashchange", () => {
    if (takeKeyFromFragment()) {
      keyInput.value = window.localStorage.getItem(KEY_STORE) || "";
      guarded(loadAll);
    }
  });
  $("base-model").addEventListener("change", showBaseModelInfo);

  $("upload-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(async () => {
      const file = $("upload-file").files[0];
      if (!file) throw new ApiError(0, "no_file", "Choose a .zip or .tar.gz archive first.", {});
      $("upload-button").disabled = true;
      try {
        await uploadDataset(file, $("upload-name").value.trim());
      } finally {
        $("upload-button").disabled = false;
        if ($("upload-status").textContent.startsWith("Uploading")) $("upload-status").textContent = "";
      }
    });
  });

  $("plan-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(showPlan);
  });
  $("start-job").addEventListener("click", () => guarded(startJob));
  $("cancel-job").addEventListener("click", () => guarded(async () => {
    if (state.jobId) showJob(await api("POST", `/v1/jobs/${seg(state.jobId)}/cancel`));
  }));
  $("refresh-lists").addEventListener("click", () => guarded(() => refreshLists()));
  $("quality-model").addEventListener("change", () => guarded(showQuality));
  $("compare-model").addEventListener("change", () => guarded(showQuality));
  $("evaluate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(startEvaluation);
  });
  $("batch-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(startBatchPrediction);
  });
  initDeployments(); // deployments.js: its own section's handlers
  window.addEventListener("resize", () => { if (state.chart) state.chart.resize(); });

  const zone = $("drop-zone");
  $("predict-file").addEventListener("change", (event) => {
    const files = Array.from(event.target.files);
    event.target.value = ""; // choosing the same file again classifies it again
    guarded(() => predict(files));
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    guarded(() => predict(event.dataTransfer.files));
  });

  guarded(loadAll);
}

if (typeof document !== "undefined") document.addEventListener("DOMContentLoaded", init);
