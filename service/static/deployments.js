// The Deployments section: a tenant's stable names for served models (/v1/deployments): the
// list, create, change (one model, or a split of two by weight), a shadow, roll back, delete;
// one deployment's figures, a column per model side by side (so a canary reads beside the
// incumbent), and its history.
// Loaded after app.js (classic scripts, one global scope): it calls that file's api(), $(),
// seg(), guarded(), button(), cell() and setOptions(), and quality.js's table builders, only
// when the page runs, never while loading, so node can load its pure parts alone
// (tests/integration/test_ui_views.py). Every request is an api() call with a literal template
// path: test_ui_page.py checks each against the app's OpenAPI, as it does app.js's.
"use strict";

const DEPLOYMENT_NAME = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
const DEPLOYMENT_MAX_WEIGHT = 10000;
const DEPLOYMENT_TOP_LABELS = 5;

// -- pure helpers (also loaded by node in the tests) --------------------------------------------

// "mdl_a" for one model; "mdl_a 90 (90%), mdl_b 10 (10%)" for a split: weight and share.
function splitText(targets) {
  const list = targets || [];
  if (list.length === 1) return list[0].model_id;
  const total = list.reduce((sum, t) => sum + t.weight, 0);
  return list.map((t) => `${t.model_id} ${t.weight} (${deploymentShare(t.weight, total)})`).join(", ");
}

// A share in per cent, one decimal at most: "90%", "33.3%".
function deploymentShare(part, total) {
  if (!total) return "–";
  return `${Number(((100 * part) / total).toFixed(1))}%`;
}

// What a deployment served before or after a change: its split, and its shadow if any.
function targetsText(snapshot) {
  if (!snapshot) return "–";
  const shadow = snapshot.shadow_model_id ? `; shadow ${snapshot.shadow_model_id}` : "";
  return splitText(snapshot.targets) + shadow;
}

const DEPLOYMENT_ACTIONS = { created: "created", updated: "updated", rolled_back: "rolled back" };

// One history row's texts: version, action, who (the API key's id), from, to. (When is shown
// by the element, from `at`.)
function historyTexts(change) {
  return [
    String(change.version),
    DEPLOYMENT_ACTIONS[change.action] || change.action,
    change.actor || "–",
    targetsText(change.before),
    targetsText(change.after),
  ];
}

// A latency bound in words: "≤ 25 ms"; null above the last bucket (10 s).
function latencyBound(ms) {
  return ms === null || ms === undefined ? "> 10 s" : `≤ ${ms} ms`;
}

// The figures of GET /v1/deployments/{name}/stats as rows of texts, one column per model:
// [what, ...one text per model]. The top first labels are drawn as bars (topLabels).
function statsRows(stats) {
  const models = stats.models || [];
  const weights = models.reduce((sum, m) => sum + (m.weight || 0), 0);
  const latency = (m, key) => (m.latency_ms ? m.latency_ms[key] : undefined);
  const row = (what, f) => [what, ...models.map(f)];
  return [
    row("Role", (m) => m.role),
    row("Weight", (m) => (m.weight === null || m.weight === undefined ? "–" : `${m.weight} (${deploymentShare(m.weight, weights)})`)),
    row("Requests", (m) => String(m.requests)),
    row("Errors", (m) => String(m.errors)),
    row("Images", (m) => String(m.images)),
    row("Mean latency", (m) => (m.latency_ms ? `${m.latency_ms.mean.toFixed(1)} ms` : "–")),
    row("p50 latency", (m) => (m.latency_ms ? latencyBound(latency(m, "p50")) : "–")),
    row("p95 latency", (m) => (m.latency_ms ? latencyBound(latency(m, "p95")) : "–")),
    row("Shadow agreement", agreementText),
  ];
}

// A shadow's agreement with the targets that answered: "87.5% (7 of 8 images)"; "–" for a
// target, or a shadow that compared nothing yet.
function agreementText(model) {
  const a = model.agreement;
  if (!a || !a.compared) return "–";
  return `${((100 * a.agreed) / a.compared).toFixed(1)}% (${a.agreed} of ${a.compared} images)`;
}

// The most frequent first labels, most first (then by name: an object's key order is not to be
// trusted for labels like "1"), each with its share of the labelled images.
function topLabels(model, n = DEPLOYMENT_TOP_LABELS) {
  const entries = Object.entries(model.top1_labels || {});
  const total = entries.reduce((sum, [, count]) => sum + count, 0);
  entries.sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  return entries.slice(0, n).map(([label, count]) => ({ label, count, share: total ? count / total : 0 }));
}

// The PATCH body of the change form: one model (no second one), or a split of two by weight.
// {body} or {error: what to fix}.
function changeBody(first, firstWeight, second, secondWeight) {
  if (!first) return { error: "Choose the model it should serve." };
  if (!second) return { body: { model_id: first } };
  if (second === first) return { error: "A split needs two different models." };
  const weights = [firstWeight, secondWeight].map((w) => Number(String(w).trim()));
  if (!weights.every((w) => Number.isInteger(w) && w >= 1 && w <= DEPLOYMENT_MAX_WEIGHT)) {
    return { error: `Weights: whole numbers from 1 to ${DEPLOYMENT_MAX_WEIGHT}.` };
  }
  return { body: { targets: [{ model_id: first, weight: weights[0] }, { model_id: second, weight: weights[1] }] } };
}

// The create form's body, or what is wrong with the name.
function createBody(name, modelId) {
  const n = (name || "").trim();
  if (!DEPLOYMENT_NAME.test(n)) {
    return { error: "Name: lower-case letters, digits and hyphens (a DNS label: at most 63, no hyphen first or last)." };
  }
  if (!modelId) return { error: "Choose the model it should serve (train or publish one first)." };
  return { body: { name: n, model_id: modelId } };
}

if (typeof module !== "undefined" && module.exports) {
  module.exports = {
    splitText, deploymentShare, targetsText, historyTexts, latencyBound, statsRows, agreementText,
    topLabels, changeBody, createBody,
  };
}

// -- elements ------------------------------------------------------------------------------------

// The figures, one column per model; the top first labels as small bars.
function deploymentStatsTable(stats) {
  const models = stats.models || [];
  const { table, body } = qualityTable(
    `Figures of ${stats.deployment} (version ${stats.version}), per model`,
    "deployment-figures",
    ["", ...models.map((m) => m.model_id)],
  );
  for (const [what, ...values] of statsRows(stats)) {
    const row = body.insertRow();
    qualityRowHeader(row, what);
    for (const v of values) row.appendChild(qualityEl("td", v));
  }
  const row = body.insertRow();
  qualityRowHeader(row, "Top first labels");
  for (const m of models) {
    const td = document.createElement("td");
    const list = qualityEl("ul", null, "top-labels");
    for (const { label, count, share } of topLabels(m)) {
      const li = qualityEl("li", null, "bar-cell");
      const track = qualityEl("span", null, "bar");
      const fill = qualityEl("span", null, "bar-fill");
      fill.style.width = `${share * 100}%`;
      track.appendChild(fill);
      li.append(qualityEl("span", label, "label"), track, qualityEl("span", String(count), "bar-value"));
      list.appendChild(li);
    }
    td.appendChild(list.children.length ? list : qualityEl("span", "–"));
    row.appendChild(td);
  }
  return table;
}

function timeEl(iso) {
  const node = qualityEl("time", iso ? new Date(iso).toLocaleString() : "–");
  if (iso) node.setAttribute("datetime", iso);
  return node;
}

// -- talking to the API (app.js's api()) and the section's state ---------------------------------

// items: the list last shown; selected: the deployment whose figures and history are shown;
// view: the number of the latest detail view asked for (an older answer arriving later is dropped).
const deploymentState = { items: [], selected: null, view: 0 };

function deploymentStatus(text) {
  $("deployment-status").textContent = text;
}

// The model selects of the section, from the list refreshLists() fetched.
function setDeploymentModels(models) {
  const label = (m) => `${m.id} (${(m.classes || []).join(", ")})`;
  setOptions($("deploy-model"), models, label);
  setOptions($("change-model"), models, label);
  // Their first option is "nothing": one model only, no shadow.
  const withNone = [{ id: "" }, ...models];
  setOptions($("change-second"), withNone, (m) => (m.id ? label(m) : "none: every request to the first"));
  setOptions($("shadow-model"), withNone, (m) => (m.id ? label(m) : "no shadow"));
}

async function refreshDeployments() {
  const { items } = await api("GET", `/v1/deployments`, { query: { limit: 100 } });
  deploymentState.items = items;
  const body = $("deployments-list").tBodies[0];
  body.replaceChildren();
  for (const d of items) {
    const row = body.insertRow();
    [d.name, splitText(d.targets), d.shadow_model_id || "–", String(d.version)].forEach((t) => cell(row, t));
    cell(row, "").appendChild(timeEl(d.updated_at));
    cell(row, "").append(
      button("Show", () => showDeployment(d.name), `Show deployment ${d.name}`),
      button("Delete", async () => {
        if (!window.confirm(`Delete deployment ${d.name}? Its models stay.`)) return;
        await api("DELETE", `/v1/deployments/${seg(d.name)}`);
        if (deploymentState.selected === d.name) closeDeployment();
        $("deploy-status").textContent = `Deleted ${d.name}.`;
        await refreshDeployments();
      }, `Delete deployment ${d.name}`),
    );
  }
  // The detail stays as shown (its form may hold a change being made), unless it went.
  if (deploymentState.selected && !items.some((d) => d.name === deploymentState.selected)) closeDeployment();
}

function closeDeployment() {
  deploymentState.selected = null;
  deploymentState.view += 1;
  $("deployment-detail").hidden = true;
  $("deployment-stats").replaceChildren();
  $("deployment-history").tBodies[0].replaceChildren();
}

// The change form starts from what the deployment serves now (its first two targets).
function showDeploymentForm(d) {
  $("deployment-title").textContent = `Deployment ${d.name}: version ${d.version}, serves ${splitText(d.targets)}` +
    (d.shadow_model_id ? `, shadow ${d.shadow_model_id}` : "");
  const [first, second] = d.targets;
  $("change-model").value = first.model_id;
  $("change-weight").value = String(second ? first.weight : 90);
  $("change-second").value = second ? second.model_id : "";
  $("change-second-weight").value = String(second ? second.weight : 10);
  $("shadow-model").value = d.shadow_model_id || "";
}

async function showDeployment(name) {
  const ticket = ++deploymentState.view;
  deploymentState.selected = name;
  const [d, stats, history] = await Promise.all([
    api("GET", `/v1/deployments/${seg(name)}`),
    api("GET", `/v1/deployments/${seg(name)}/stats`),
    api("GET", `/v1/deployments/${seg(name)}/history`, { query: { limit: 100 } }),
  ]);
  if (ticket !== deploymentState.view) return; // another deployment was chosen meanwhile
  $("deployment-detail").hidden = false;
  showDeploymentForm(d);
  showDeploymentStats(stats);
  showDeploymentHistory(history.items);
}

function showDeploymentStats(stats) {
  $("deployment-stats").replaceChildren(
    stats.models.length ? deploymentStatsTable(stats) : qualityEl("p", "No request through this name yet.", "hint"),
  );
  $("stats-status").textContent = `Figures of version ${stats.version} as of ${new Date().toLocaleTimeString()}.`;
}

function showDeploymentHistory(items) {
  const body = $("deployment-history").tBodies[0];
  body.replaceChildren();
  for (const change of items) {
    const row = body.insertRow();
    const [version, action, actor, from, to] = historyTexts(change);
    [version, action, actor].forEach((t) => cell(row, t));
    cell(row, "").appendChild(timeEl(change.at));
    [from, to].forEach((t) => cell(row, t));
  }
}

async function refreshDeploymentStats() {
  const name = deploymentState.selected;
  if (!name) return;
  const ticket = deploymentState.view;
  const stats = await api("GET", `/v1/deployments/${seg(name)}/stats`);
  if (ticket === deploymentState.view) showDeploymentStats(stats);
}

// A change went through: the list, the form, the figures and the history again; said once
// they are all in (the form is then the deployment's, and what is chosen next stays).
async function deploymentChanged(d, what) {
  await refreshDeployments();
  await showDeployment(d.name);
  deploymentStatus(`${d.name} ${what}: version ${d.version}, serves ${splitText(d.targets)}.`);
}

async function createDeployment() {
  const { body, error } = createBody($("deploy-name").value, $("deploy-model").value);
  if (error) throw new ApiError(0, "invalid_deployment", error, {});
  $("deploy-button").disabled = true;
  $("deploy-status").textContent = `Creating ${body.name} (its model is loaded and warmed first)…`;
  try {
    const d = await api("POST", `/v1/deployments`, { json: body });
    $("deploy-name").value = "";
    await refreshDeployments();
    await showDeployment(d.name);
    deploymentStatus("");
    $("deploy-status").textContent = `Created ${d.name}: serves ${splitText(d.targets)}.`;
  } catch (err) {
    $("deploy-status").textContent = "";
    throw err;
  } finally {
    $("deploy-button").disabled = false;
  }
}

// PATCH the selected deployment; the buttons wait until the answer (models load first).
async function patchDeployment(json, what) {
  const name = deploymentState.selected;
  if (!name) return;
  deploymentStatus(`Changing ${name} (new models are loaded and warmed first)…`);
  const d = await api("PATCH", `/v1/deployments/${seg(name)}`, { json });
  await deploymentChanged(d, what);
}

async function changeDeployment() {
  const { body, error } = changeBody(
    $("change-model").value, $("change-weight").value, $("change-second").value, $("change-second-weight").value,
  );
  if (error) throw new ApiError(0, "invalid_change", error, {});
  await patchDeployment(body, "changed");
}

async function setShadow() {
  const shadow = $("shadow-model").value || null;
  await patchDeployment({ shadow_model_id: shadow }, shadow ? `shadowed by ${shadow}` : "without a shadow");
}

async function rollBackDeployment() {
  const name = deploymentState.selected;
  if (!name) return;
  deploymentStatus(`Rolling ${name} back…`);
  const d = await api("POST", `/v1/deployments/${seg(name)}/rollback`);
  await deploymentChanged(d, "rolled back");
}

// While a change is made, its buttons are off (a second click would race the first).
function deploymentAction(fn) {
  const ids = ["change-button", "shadow-button", "rollback-button"];
  return () => guarded(async () => {
    for (const id of ids) $(id).disabled = true;
    try {
      await fn();
    } catch (err) {
      deploymentStatus("");
      throw err;
    } finally {
      for (const id of ids) $(id).disabled = false;
    }
  });
}

function initDeployments() {
  $("deploy-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(createDeployment);
  });
  $("change-form").addEventListener("submit", (event) => {
    event.preventDefault();
    deploymentAction(changeDeployment)();
  });
  $("shadow-button").addEventListener("click", deploymentAction(setShadow));
  $("rollback-button").addEventListener("click", deploymentAction(rollBackDeployment));
  $("stats-refresh").addEventListener("click", () => guarded(refreshDeploymentStats));
  $("refresh-deployments").addEventListener("click", () => guarded(refreshDeployments));
}
