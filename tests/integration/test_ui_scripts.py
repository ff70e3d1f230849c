"""The page script's pure parts, run with node when it is installed (no browser is needed): the
Server-Sent Events parser, the formatters, the error text, the URL fragment's key, the
ingestion phase; and the page's scripts loaded as the browser loads them, into one scope.
The views' pure parts: test_ui_views.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.integration.ui_helpers import APP_JS, PAGE_SCRIPTS, _node

pytestmark = pytest.mark.integration

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
