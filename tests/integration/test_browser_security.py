"""Issue 11, "browsers, names & logs", over real HTTP: each finding's original request, and the
answer it gets now (docs/security.md, "Browsers, names and logs").

- DNS rebinding: a request naming another Host -> 400 `host_not_allowed`.
- CSRF: a cross-site multipart upload -> 403 `cross_origin_refused`, nothing stored; the web
  page's own (same-origin) upload and a plain client's still work.
- Security headers on every answer; /docs loads Swagger UI from this server, not a CDN.
- Control characters in names (dataset, key, job, tenant) -> 422 `invalid_request` naming the
  field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from service.settings import Settings
from tests.imagegen import make_archive, make_image_folder
from tests.integration.conftest import LiveServer
from tests.integration.datasets_helpers import upload_ready

pytestmark = pytest.mark.integration

EVIL = "https://evil.example"


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return make_archive(make_image_folder(tmp_path / "pets", {"cat": 2, "dog": 2}))


def _upload(
    client: httpx.Client, archive: Path, headers: dict[str, str], name: str | None = None
) -> httpx.Response:
    files = {"file": ("pets.zip", archive.read_bytes(), "application/zip")}
    return client.post(
        "/v1/datasets", files=files, data={"name": name} if name else None, headers=headers
    )


def _stored(settings: Settings) -> list[str]:
    """The folders in datasets/ and uploads/ (archives stored, waiting for ingestion)."""
    store = settings.artifact_root
    return sorted(
        f"{kind}/{p.name}"
        for kind in ("datasets", "uploads")
        if (store / kind).exists()
        for p in (store / kind).iterdir()
    )


def _dataset_ids(client: httpx.Client) -> set[str]:
    return {d["id"] for d in client.get("/v1/datasets", params={"limit": 100}).json()["items"]}


def _healthy(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/v1/datasets").status_code == 200


# -- DNS rebinding and CSRF -------------------------------------------------------------------


def test_dns_rebinding_a_foreign_host_header_is_refused_400(client: httpx.Client) -> None:
    for path in ("/v1/datasets", "/healthz", "/", "/docs"):
        response = client.get(path, headers={"Host": "evil.example"})
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["code"] == "host_not_allowed"
        assert response.json()["error"]["details"] == {"host": "evil.example"}
        assert response.headers["x-content-type-options"] == "nosniff"
    # A name that merely starts like an allowed one is foreign too.
    for host in ("localhost.evil.example", "127.0.0.1.evil.example:80", "evil.example:8000"):
        assert client.get("/healthz", headers={"Host": host}).status_code == 400, host
    _healthy(client)


def test_the_loopback_names_are_allowed_with_any_port(
    client: httpx.Client, live_server_instance: LiveServer
) -> None:
    port = live_server_instance.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert client.get("/v1/datasets", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_setting_adds_names_and_star_allows_any(
    settings: Settings, start_server: Callable[..., LiveServer]
) -> None:
    start = start_server
    named = start(settings.model_copy(update={"allowed_hosts": ["api.example.com"]}))
    with httpx.Client(base_url=named.url, headers=named.headers) as http:
        assert http.get("/healthz", headers={"Host": "api.example.com:8443"}).status_code == 200
        assert http.get("/healthz", headers={"Host": "evil.example"}).status_code == 400
    anything = start(settings.model_copy(update={"allowed_hosts": ["*"]}))
    with httpx.Client(base_url=anything.url, headers=anything.headers) as http:
        assert http.get("/healthz", headers={"Host": "evil.example"}).status_code == 200


def test_a_cross_site_multipart_upload_is_refused_403_and_nothing_is_stored(
    client: httpx.Client, settings: Settings, archive: Path
) -> None:
    before_rows, before_files = _dataset_ids(client), _stored(settings)
    refusals = [
        {"Origin": EVIL},
        {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "cross-site"},  # a browser that sends no Origin
        {"Sec-Fetch-Site": "same-site"},  # another port or subdomain of the same site
        {"Origin": "null"},  # a sandboxed iframe or a file:// page
        {"Origin": f"http://127.0.0.1:{client.base_url.port + 1}"},  # another local port
    ]
    for headers in refusals:
        response = _upload(client, archive, headers)
        assert response.status_code == 403, (headers, response.text)
        body = response.json()["error"]
        assert body["code"] == "cross_origin_refused", headers
        assert "BITSERVE_ALLOWED_ORIGINS" in body["message"]
    assert _dataset_ids(client) == before_rows
    assert _stored(settings) == before_files
    # The same cross-site request on other state-changing routes.
    job = client.post("/v1/jobs", json={"dataset_id": "ds_x"}, headers={"Origin": EVIL})
    assert (job.status_code, job.json()["error"]["code"]) == (403, "cross_origin_refused")
    key = client.post("/v1/keys", json={"scopes": ["admin"]}, headers={"Origin": EVIL})
    assert (key.status_code, key.json()["error"]["code"]) == (403, "cross_origin_refused")
    # A cross-site GET changes nothing and cannot read the answer (no CORS): allowed.
    assert client.get("/v1/datasets", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200
    _healthy(client)


def test_same_origin_pages_and_plain_clients_may_still_upload(
    client: httpx.Client, archive: Path
) -> None:
    own_origin = f"http://127.0.0.1:{client.base_url.port}"
    for headers in (
        {"Origin": own_origin, "Sec-Fetch-Site": "same-origin"},  # the web page's fetch
        {},  # the CLI, the Python client, curl: no browser headers at all
    ):
        dataset = upload_ready(client, archive, filename="pets.zip", headers=headers)
        assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204


def test_allowed_origins_setting_lets_a_listed_page_write(
    settings: Settings, start_server: Callable[..., LiveServer], archive: Path
) -> None:
    start = start_server
    server = start(settings.model_copy(update={"allowed_origins": ["https://ui.example.com"]}))
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        listed = {"Origin": "https://ui.example.com", "Sec-Fetch-Site": "cross-site"}
        # Ingested by the session's worker: this server has the same store and ingest queue.
        dataset = upload_ready(http, archive, filename="pets.zip", headers=listed)
        assert http.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
        assert _upload(http, archive, {"Origin": EVIL}).status_code == 403


# -- headers and /docs ------------------------------------------------------------------------


def test_every_answer_carries_the_security_headers(client: httpx.Client) -> None:
    answers = {
        "json": client.get("/v1/datasets"),
        "error": client.get("/v1/datasets/ds_aaaaaaaaaaaaaaaaaaaa"),
        "unauthenticated": httpx.get(f"{client.base_url}/v1/datasets"),
        "health": client.get("/healthz"),
        "metrics": client.get("/metrics"),
        "page": client.get("/"),
        "docs": client.get("/docs"),
    }
    assert [a.status_code for a in answers.values()] == [200, 404, 401, 200, 200, 200, 200]
    for what, answer in answers.items():
        assert answer.headers["x-content-type-options"] == "nosniff", what
        assert answer.headers["referrer-policy"] == "no-referrer", what
        assert answer.headers["x-frame-options"] == "DENY", what
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"], what
    for what in ("json", "error", "unauthenticated", "health"):
        assert answers[what].headers["cache-control"] == "no-store", what
    # The pages keep their own policies: scripts from this server only.
    assert "script-src 'self'" in answers["page"].headers["content-security-policy"]
    assert "script-src 'self'" in answers["docs"].headers["content-security-policy"]


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        url = values.get("src") or values.get("href")
        if url:
            self.urls.append(url)
        elif tag == "script":
            self.inline_scripts += 1


def test_docs_loads_swagger_ui_from_this_server_not_a_cdn(client: httpx.Client) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", page.text), page.text  # no external host at all
    assets = _Assets()
    assets.feed(page.text)
    assert assets.inline_scripts == 0  # the CSP allows none
    assert sorted(assets.urls) == [
        "/docs/docs.js",
        "/docs/favicon-32x32.png",
        "/docs/swagger-ui-bundle.js",
        "/docs/swagger-ui.css",
    ]
    for url in assets.urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    bundle = client.get("/docs/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith("text/javascript")
    assert "SwaggerUIBundle" in bundle.text
    # FastAPI writes OpenAPI 3.1, which Swagger UI reads from version 5 on: 4.x shows "Unable
    # to render this definition" instead of the API (seen in Chromium with swagger-ui 4.15.5).
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    version = re.search(r'PACKAGE_VERSION:"(\d+)\.(\d+)\.(\d+)"', bundle.text)
    assert version is not None and int(version.group(1)) >= 5, version
    assert "/openapi.json" in client.get("/docs/docs.js").text
    assert client.get("/openapi.json").status_code == 200
    # No path from the URL reaches the file system; ReDoc (a CDN too) is gone.
    assert client.get("/docs/..%2Fpyproject.toml").status_code == 404
    assert client.get("/docs/index.html").status_code == 404
    assert client.get("/redoc").status_code == 404


# -- names ------------------------------------------------------------------------------------

CONTROL_NAMES = {
    "newline": "cats\nINFO job_aaaaaaaaaaaaaaaaaaaa succeeded",
    "carriage return": "cats\rdogs",
    "NUL": "cats\x00",
    "right-to-left override": "cats\u202egpj.exe",
    "line separator": "cats\u2028dogs",
}


@pytest.mark.parametrize("kind", sorted(CONTROL_NAMES))
def test_a_dataset_name_with_a_control_character_is_refused_422(
    client: httpx.Client, settings: Settings, archive: Path, kind: str
) -> None:
    before = _stored(settings)
    response = _upload(client, archive, {}, name=CONTROL_NAMES[kind])
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["details"]["field"] == "name"
    assert re.fullmatch(r"U\+[0-9A-F]{4}", error["details"]["character"])
    assert _stored(settings) == before
    _healthy(client)


@pytest.mark.parametrize("kind", sorted(CONTROL_NAMES))
def test_a_key_name_with_a_control_character_is_refused_422(
    client: httpx.Client, kind: str
) -> None:
    response = client.post("/v1/keys", json={"scopes": ["predict"], "name": CONTROL_NAMES[kind]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["details"]["errors"][0]["loc"] == ["body", "name"]
    assert "control or format characters" in error["message"]
    assert client.post("/v1/keys", json={"scopes": ["predict"], "name": "ok"}).status_code == 201


@pytest.mark.parametrize("kind", sorted(CONTROL_NAMES))
def test_a_job_name_with_a_control_character_is_refused_422(
    client: httpx.Client, kind: str
) -> None:
    body = {"dataset_id": "ds_aaaaaaaaaaaaaaaaaaaa", "name": CONTROL_NAMES[kind]}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["errors"][0]["loc"] == ["body", "name"]


@pytest.mark.parametrize("tenant", ["acme\n", "acme\nevil", "acme\x00", "acme\u202e"])
def test_a_tenant_id_with_a_control_character_is_refused_422(
    client: httpx.Client, tenant: str
) -> None:
    created = client.post("/v1/keys", json={"scopes": ["predict"], "tenant": tenant})
    assert created.status_code == 422, created.text
    assert created.json()["error"]["details"]["field"] == "tenant"
    quotas = client.get(f"/v1/tenants/{quote(tenant)}/quotas")
    assert quotas.status_code == 422, quotas.text
    assert quotas.json()["error"]["details"]["field"] == "tenant"


def test_the_refusals_are_json_with_the_documented_shape(client: httpx.Client) -> None:
    answer = client.get("/healthz", headers={"Host": "evil.example"})
    assert answer.headers["content-type"] == "application/json"
    assert set(json.loads(answer.text)) == {"error"}
    assert set(answer.json()["error"]) == {"code", "message", "details"}
