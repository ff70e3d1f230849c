"""The web page over real HTTP (uvicorn): GET /, its static files, and that its script calls only
routes the app really has (each api("METHOD", `path`) against /openapi.json).

The script's pure parts are run with node in test_ui_scripts.py and test_ui_views.py, the page's
flows against the real server in test_ui_flows.py; test_ui_browser.py runs the page in a real
browser.
"""

from __future__ import annotations

import re

import httpx
import pytest

from tests.integration.ui_helpers import CALLING_SCRIPTS, STATIC, PageParser

pytestmark = pytest.mark.integration

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
