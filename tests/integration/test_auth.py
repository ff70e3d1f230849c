"""Every /v1 route, read from the live /openapi.json, called with every kind of key that must be
refused, on PostgreSQL over real HTTP:

    no key, a bad key, a revoked key, an expired key  -> 401 (WWW-Authenticate: Bearer)
    a key without the scope the route declares        -> 403 insufficient_scope
    a valid admin key of another tenant               -> 404, exactly as an unknown id

A route added later is called too, without anyone editing this test: it fails unless the
route declares its scope (`security` in the contract) and this test knows how to build its
request (a new path parameter or body schema must be added to IDS / BODIES below).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
import torch

from bitcore.models import create_model
from service import api_keys
from service.api_keys import Scope
from service.ids import utcnow
from tests.imagegen import class_image, encode
from tests.integration.conftest import LiveServer, make_key
from tests.integration.datasets_helpers import upload_ready
from tests.model_fixtures import publish_model

pytestmark = pytest.mark.integration

METHODS = ("get", "post", "put", "patch", "delete")
OTHER_TENANT = "auth-intruder"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    scopes: frozenset[str]
    body: str | None  # the request body's schema (or media type) name, if any

    def __str__(self) -> str:
        return f"{self.method.upper()} {self.path}"


def routes_of(spec: dict[str, Any]) -> list[Route]:
    found = []
    for path, item in spec["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in item.items():
            if method not in METHODS:
                continue
            security = operation.get("security")
            assert security, f"{method.upper()} {path} declares no API key (security)"
            scopes = {
                frozenset(requirement[name]) for requirement in security for name in requirement
            }
            assert len(scopes) == 1, f"{method.upper()} {path}: schemes disagree on scopes"
            found.append(Route(method, path, next(iter(scopes)), _body_name(operation)))
    return found


def _body_name(operation: dict[str, Any]) -> str | None:
    content = operation.get("requestBody", {}).get("content", {})
    if not content:
        return None
    media, body = next(iter(content.items()))
    ref = body.get("schema", {}).get("$ref")
    return ref.rsplit("/", 1)[-1] if ref else media


@dataclass
class Objects:
    """Objects of tenant "default" (the server's own key) that the requests point at."""

    ids: dict[str, str]
    zip_bytes: bytes
    png: bytes


@pytest.fixture(scope="module")
def objects(live_server_instance: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Objects:
    server = live_server_instance
    state = server.app.state
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        for label in ("ant", "bee"):
            for index in range(3):
                image = encode(class_image(label == "bee", 2, (40, 48), seed=index), "PNG")
                out.writestr(f"{label}/{index}.png", image)
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        # Ready (ingested by the session's worker): a job can be created on it.
        dataset_id = upload_ready(http, archive.getvalue(), filename="pets.zip")["id"]
        job = http.post(
            "/v1/jobs",
            json={
                "dataset_id": dataset_id,
                "base_model": "tiny-R10x0.25",
                "overrides": {"steps": 2},
            },
        )
        assert job.status_code == 202, job.text
    torch.manual_seed(0)
    model_id, _ = publish_model(
        state.db,
        state.storage,
        create_model("tiny-R10x0.25", 2),
        "tiny-R10x0.25",
        ["ant", "bee"],
        32,
    )
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as http:
        # Queued: this server's worker takes the ingest queue only.
        evaluation = http.post(
            f"/v1/models/{model_id}/evaluations", json={"dataset_id": dataset_id}
        )
        assert evaluation.status_code == 202, evaluation.text
        batch = http.post(
            f"/v1/models/{model_id}/batch-predictions", json={"dataset_id": dataset_id}
        )
        assert batch.status_code == 202, batch.text
        deployment = http.post("/v1/deployments", json={"name": "pets", "model_id": model_id})
        assert deployment.status_code == 201, deployment.text
    with state.db.sessionmaker() as session:
        viewed = api_keys.create_key(
            session, tenant_id="default", scopes=[Scope.PREDICT], pepper=None, name="a key"
        )
    ids = {
        "dataset_id": dataset_id,
        "job_id": job.json()["id"],
        "model_id": model_id,
        "key_id": viewed.row.id,
        "tenant": "default",
        "evaluation_id": evaluation.json()["id"],
        "index": "0",
        "batch_prediction_id": batch.json()["id"],
        "name": "pets",
    }
    png = encode(class_image(0, 2, (40, 48), seed=9), "PNG")
    return Objects(ids, archive.getvalue(), png)


# How to build each body the contract names. A new body schema fails the test until added.
BODIES: dict[str, Callable[[Objects], dict[str, Any]]] = {
    "JobCreate": lambda o: {
        "json": {"dataset_id": o.ids["dataset_id"], "base_model": "tiny-R10x0.25"}
    },
    "EvaluationCreate": lambda o: {"json": {"dataset_id": o.ids["dataset_id"]}},
    "BatchPredictionCreate": lambda o: {"json": {"dataset_id": o.ids["dataset_id"]}},
    "KeyCreate": lambda o: {"json": {"scopes": ["predict"]}},
    "QuotasUpdate": lambda o: {"json": {}},
    "DeploymentCreate": lambda o: {"json": {"name": "cats", "model_id": o.ids["model_id"]}},
    "DeploymentUpdate": lambda o: {"json": {"model_id": o.ids["model_id"]}},
    "multipart/form-data": lambda o: {"files": {"file": ("pets.zip", o.zip_bytes)}},
}
PREDICT_BODY = lambda o: {"files": [("files", ("a.png", o.png))]}  # noqa: E731


def request_of(route: Route, objects: Objects) -> dict[str, Any]:
    path = route.path
    for name, value in objects.ids.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, f"{route}: add its path parameter to the `objects` fixture"
    if route.path.endswith("/predict"):
        body = PREDICT_BODY(objects)
    elif route.body is not None:
        assert route.body in BODIES, f"{route}: add a body for {route.body!r} to BODIES"
        body = BODIES[route.body](objects)
    else:
        body = {}
    return {"method": route.method.upper(), "url": path, **body}


@dataclass(frozen=True)
class Keys:
    revoked: str
    expired: str
    by_scope: dict[str, str]  # a key holding only that scope
    other_tenant: str  # an admin (not global) of another tenant


@pytest.fixture(scope="module")
def keys(live_server_instance: LiveServer) -> Keys:
    server = live_server_instance
    db, settings = server.app.state.db, server.settings
    revoked = make_key(db, settings)
    with db.sessionmaker() as session:
        api_keys.revoke_key(session, None, f"key_{revoked[4:24]}")
    expired = make_key(db, settings, now=utcnow() - timedelta(days=2), expires_in=timedelta(days=1))
    by_scope = {s.value: make_key(db, settings, scopes=(s,)) for s in Scope}
    return Keys(revoked, expired, by_scope, make_key(db, settings, tenant=OTHER_TENANT))


@pytest.fixture(scope="module")
def http(live_server_instance: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server_instance.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def routes(http: httpx.Client) -> list[Route]:
    return routes_of(http.get("/openapi.json").json())


def _call(http: httpx.Client, request: dict[str, Any], key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return http.request(headers=headers, **request)


def _assert_error(response: httpx.Response, status: int, code: str, route: Route) -> None:
    assert response.status_code == status, f"{route}: {response.status_code} {response.text}"
    assert response.json()["error"]["code"] == code, f"{route}: {response.text}"


def test_the_walk_sees_every_route(routes: list[Route]) -> None:
    # With job metrics, 4 evaluation, 5 batch prediction and 9 deployment routes.
    assert len(routes) == 43
    assert {str(r) for r in routes if r.scopes == {"admin"}} >= {
        "POST /v1/keys",
        "GET /v1/keys",
        "GET /v1/tenants/{tenant}/quotas",
        "PUT /v1/tenants/{tenant}/quotas",
        "GET /v1/audit",
    }


def test_refused_keys_answer_401(
    http: httpx.Client, routes: list[Route], objects: Objects, keys: Keys
) -> None:
    bad = [
        "bsk_" + "a" * 20 + "_" + "b" * 43,  # well-formed, unknown
        keys.revoked[:-4] + "AAAA",  # a real key id with a wrong secret
        "not-a-key",
    ]
    for route in routes:
        request = request_of(route, objects)
        response = _call(http, request, None)
        _assert_error(response, 401, "missing_api_key", route)
        assert response.headers["www-authenticate"] == 'Bearer realm="bitserve"'
        for key in (*bad, keys.revoked, keys.expired):
            response = _call(http, request, key)
            _assert_error(response, 401, "invalid_api_key", route)
            assert "invalid_token" in response.headers["www-authenticate"]
            assert key not in response.text
        # The same key in X-API-Key is refused the same way.
        response = http.request(headers={"X-API-Key": keys.expired}, **request)
        _assert_error(response, 401, "invalid_api_key", route)


def test_a_key_without_the_routes_scope_answers_403(
    http: httpx.Client, routes: list[Route], objects: Objects, keys: Keys
) -> None:
    unrefusable = []
    for route in routes:
        wrong = [s for s in keys.by_scope if s != "admin" and s not in route.scopes]
        if not wrong:
            unrefusable.append(str(route))
        for scope in wrong:
            response = _call(http, request_of(route, objects), keys.by_scope[scope])
            _assert_error(response, 403, "insufficient_scope", route)
            assert response.json()["error"]["details"]["needed"] == sorted(route.scopes)
    # Reading models, their evaluations, batch predictions and deployments is every non-admin
    # scope's business (train and predict alike).
    assert sorted(unrefusable) == [
        "GET /v1/batch-predictions/{batch_prediction_id}",
        "GET /v1/batch-predictions/{batch_prediction_id}/output",
        "GET /v1/deployments",
        "GET /v1/deployments/{name}",
        "GET /v1/deployments/{name}/history",
        "GET /v1/deployments/{name}/stats",
        "GET /v1/evaluations/{evaluation_id}",
        "GET /v1/evaluations/{evaluation_id}/examples/{index}",
        "GET /v1/models",
        "GET /v1/models/{model_id}",
        "GET /v1/models/{model_id}/batch-predictions",
        "GET /v1/models/{model_id}/evaluations",
    ]


def test_another_tenants_admin_sees_404_for_our_objects(
    http: httpx.Client,
    routes: list[Route],
    objects: Objects,
    keys: Keys,
    live_server_instance: LiveServer,
) -> None:
    pointed = [r for r in routes if "{" in r.path or r.body == "JobCreate"]
    assert len(pointed) >= 12
    for route in pointed:
        response = _call(http, request_of(route, objects), keys.other_tenant)
        _assert_error(response, 404, "not_found", route)
    # Nothing was touched: the objects are all still there for their own tenant.
    for path in ("datasets/{dataset_id}", "jobs/{job_id}", "models/{model_id}"):
        url = "/v1/" + path.format(**objects.ids)
        assert http.get(url, headers=live_server_instance.headers).status_code == 200, url


def test_a_good_key_works_in_either_header(
    http: httpx.Client, live_server_instance: LiveServer, keys: Keys
) -> None:
    predict = keys.by_scope["predict"]
    assert http.get("/v1/models", headers={"Authorization": f"Bearer {predict}"}).status_code == 200
    assert http.get("/v1/models", headers={"X-API-Key": predict}).status_code == 200
    assert (
        http.get("/v1/models", headers={"Authorization": f"bearer  {predict}"}).status_code == 200
    )
    # Health, readiness and metrics stay open (no key).
    for path in ("/healthz", "/readyz", "/metrics"):
        assert http.get(path).status_code == 200, path


def test_keys_are_stored_as_keyed_hashes_only(live_server_instance: LiveServer, keys: Keys) -> None:
    import sqlalchemy as sa

    from service.tables import ApiKey

    key = keys.by_scope["train"]
    key_id, secret = f"key_{key[4:24]}", key[25:]
    with live_server_instance.app.state.db.sessionmaker() as session:
        row = session.get(ApiKey, key_id)
        assert row is not None
        stored = session.execute(sa.text("SELECT * FROM api_keys WHERE id = :id"), {"id": key_id})
        values = [str(v) for v in stored.one()]
    assert row.secret_hash == api_keys.hash_secret(secret, live_server_instance.settings.pepper)
    assert len(row.secret_hash) == 64 and secret not in row.secret_hash
    assert not any(secret in value or key in value for value in values)
