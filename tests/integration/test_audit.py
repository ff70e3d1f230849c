"""The audit trail over real HTTP on PostgreSQL: every POST/PUT/PATCH/DELETE under /v1 (but
predictions) leaves exactly one event, with the caller's key id and tenant, the route template,
the object and the status, refusals included; GET /v1/audit shows an admin its own tenant's
events only, a global admin any tenant's, a page at a time.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import torch

from bitcore.models import create_model
from service import audit
from service.api_keys import Scope
from service.ids import utcnow
from tests.imagegen import class_image, encode, make_archive, make_image_folder
from tests.integration.conftest import LiveServer, make_key
from tests.integration.datasets_helpers import upload_ready
from tests.model_fixtures import publish_model

pytestmark = pytest.mark.integration

Event = tuple[
    str, str, int, str | None, str | None, str | None
]  # method route status key obj tenant


def key_id(token: str) -> str:
    return f"key_{token[4:24]}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def events(http: httpx.Client, token: str, **params: Any) -> list[dict[str, Any]]:
    """Every event GET /v1/audit shows `token`, oldest first."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, "limit": 100, **({"cursor": cursor} if cursor else {})}
        response = http.get("/v1/audit", params=query, headers=bearer(token))
        assert response.status_code == 200, response.text
        items += response.json()["items"]
        cursor = response.json()["next_cursor"]
        if cursor is None:
            return items[::-1]


def as_tuples(items: list[dict[str, Any]]) -> list[Event]:
    return [
        (e["method"], e["route"], e["status"], e["key_id"], e["object_id"], e["tenant"])
        for e in items
    ]


def since(items: list[dict[str, Any]], start: datetime) -> list[dict[str, Any]]:
    return [e for e in items if datetime.fromisoformat(e["created_at"]) >= start]


@pytest.fixture
def http(live_server_instance: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server_instance.url, timeout=60) as client:
        yield client


def new_tenant(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_a_sequence_of_calls_leaves_exactly_these_events(
    http: httpx.Client,
    live_server_instance: LiveServer,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = live_server_instance
    state, settings = server.app.state, server.settings
    tenant = new_tenant("audit")
    admin = make_key(state.db, settings, tenant=tenant)
    train = make_key(state.db, settings, tenant=tenant, scopes=(Scope.TRAIN,))
    predict = make_key(state.db, settings, tenant=tenant, scopes=(Scope.PREDICT,))
    torch.manual_seed(0)
    model = create_model("tiny-R10x0.25", 2)
    model_id, _ = publish_model(
        state.db, state.storage, model, "tiny-R10x0.25", ["a", "b"], 32, tenant_id=tenant
    )
    archive = make_archive(make_image_folder(tmp_path / "pets", {"a": 2, "b": 2}))
    png = encode(class_image(0, 2, (40, 48)), "PNG")
    unknown_key = "bsk_" + "a" * 20 + "_" + "b" * 43
    start = utcnow()

    with caplog.at_level(logging.INFO, logger="service.audit"):
        # 1. an upload (the key in X-API-Key), a job, its cancel, a cancel too many
        #    (answered 202; waiting for the ingest worker only reads, which is not audited)
        upload = upload_ready(http, archive, filename="pets.zip", headers={"X-API-Key": train})
        dataset_id = upload["id"]
        body = {"dataset_id": dataset_id, "base_model": "tiny-R10x0.25", "overrides": {"steps": 2}}
        job = http.post("/v1/jobs", json=body, headers=bearer(train))
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        assert http.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(train)).status_code == 202
        assert http.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(train)).status_code == 409
        # 2. refused: the wrong scope, an unknown object, an unparseable body (refused before
        #    the key is checked: a valid key is still named, an invalid one is not), no key
        assert http.post("/v1/jobs", json=body, headers=bearer(predict)).status_code == 403
        assert http.delete(f"/v1/models/mdl_{'z' * 20}", headers=bearer(train)).status_code == 404
        bad_json = {"Content-Type": "application/json"}
        response = http.post("/v1/jobs", content=b"{", headers={**bad_json, **bearer(train)})
        assert response.status_code == 400
        response = http.post("/v1/jobs", content=b"{", headers={**bad_json, **bearer(unknown_key)})
        assert response.status_code == 400
        assert http.post("/v1/jobs", json=body, headers=bearer(unknown_key)).status_code == 401
        assert http.post("/v1/jobs", json=body).status_code == 401
        # 3. not audited: reads, and predictions (a POST that changes nothing)
        assert http.get("/v1/datasets", headers=bearer(train)).status_code == 200
        predicted = http.post(
            f"/v1/models/{model_id}/predict",
            files=[("files", ("a.png", png))],
            headers=bearer(predict),
        )
        assert predicted.status_code == 200, predicted.text
        # 4. an id in the path that is no id: kept escaped, so no line break reaches the log
        weird = http.delete("/v1/datasets/ds_x%0Aaudit%20tenant=forged", headers=bearer(train))
        assert weird.status_code == 404
        # 5. a key made and revoked by the tenant's admin; the dataset deleted
        made = http.post("/v1/keys", json={"scopes": ["predict"]}, headers=bearer(admin))
        assert made.status_code == 201, made.text
        new_key = made.json()["id"]
        assert http.delete(f"/v1/keys/{new_key}", headers=bearer(admin)).status_code == 204
        assert http.delete(f"/v1/datasets/{dataset_id}", headers=bearer(train)).status_code == 204

    t, p, a = key_id(train), key_id(predict), key_id(admin)
    forged = "'ds_x\\naudit tenant=forged'"
    expected: list[Event] = [
        ("POST", "/v1/datasets", 202, t, dataset_id, tenant),
        ("POST", "/v1/jobs", 202, t, job_id, tenant),
        ("POST", "/v1/jobs/{job_id}/cancel", 202, t, job_id, tenant),
        ("POST", "/v1/jobs/{job_id}/cancel", 409, t, job_id, tenant),
        ("POST", "/v1/jobs", 403, p, None, tenant),
        ("DELETE", "/v1/models/{model_id}", 404, t, f"mdl_{'z' * 20}", tenant),
        ("POST", "/v1/jobs", 400, t, None, tenant),
        ("DELETE", "/v1/datasets/{dataset_id}", 404, t, forged, tenant),
        ("POST", "/v1/keys", 201, a, new_key, tenant),
        ("DELETE", "/v1/keys/{key_id}", 204, a, new_key, tenant),
        ("DELETE", "/v1/datasets/{dataset_id}", 204, t, dataset_id, tenant),
    ]
    # The tenant's admin sees exactly its tenant's events, in order, each at once (the event is
    # written before the answer leaves).
    mine = events(http, admin)
    assert as_tuples(mine) == expected
    assert all(e["id"].startswith("aud_") for e in mine)
    stamps = [datetime.fromisoformat(e["created_at"]) for e in mine]
    assert stamps == sorted(stamps) and stamps[0] >= start
    # A global admin sees the same with ?tenant=, and the calls no valid key made (tenant null).
    assert events(http, server.key, tenant=tenant) == mine
    anonymous = [e for e in since(events(http, server.key), start) if e["tenant"] is None]
    assert as_tuples(anonymous) == [
        ("POST", "/v1/jobs", 400, None, None, None),
        ("POST", "/v1/jobs", 401, None, None, None),
        ("POST", "/v1/jobs", 401, None, None, None),
    ]

    # One log line per event, naming key ids, never keys.
    lines = [r.getMessage() for r in caplog.records if r.name == "service.audit"]
    assert f"audit tenant={tenant} key={t} POST /v1/jobs -> 202 object={job_id}" in lines
    assert "audit tenant=- key=- POST /v1/jobs -> 401 object=-" in lines
    assert len([line for line in lines if f"tenant={tenant} " in line]) == len(expected)
    assert all("\n" not in line for line in lines)
    for token in (admin, train, predict, unknown_key, made.json()["key"]):
        assert token not in caplog.text and token[25:] not in caplog.text


def test_each_admin_reads_its_own_tenants_events_only(
    http: httpx.Client, live_server_instance: LiveServer
) -> None:
    server = live_server_instance
    db, settings = server.app.state.db, server.settings
    ours, theirs = new_tenant("audit-ours"), new_tenant("audit-theirs")
    our_admin, their_admin = (
        make_key(db, settings, tenant=ours),
        make_key(db, settings, tenant=theirs),
    )
    our_train = make_key(db, settings, tenant=ours, scopes=(Scope.TRAIN,))
    for token in (our_admin, their_admin):
        made = http.post("/v1/keys", json={"scopes": ["train"]}, headers=bearer(token))
        assert made.status_code == 201

    assert [e["tenant"] for e in events(http, our_admin)] == [ours]
    assert [e["tenant"] for e in events(http, their_admin)] == [theirs]
    assert [e["key_id"] for e in events(http, their_admin)] == [key_id(their_admin)]
    # ?tenant= of another tenant is a global admin's; naming its own is allowed.
    response = http.get("/v1/audit", params={"tenant": theirs}, headers=bearer(our_admin))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_scope"
    assert events(http, our_admin, tenant=ours) == events(http, our_admin)
    # The audit trail is an admin's: a train key is refused.
    response = http.get("/v1/audit", headers=bearer(our_train))
    assert response.status_code == 403
    assert response.json()["error"]["details"]["needed"] == ["admin"]
    # A global admin reads either.
    assert [e["tenant"] for e in events(http, server.key, tenant=theirs)] == [theirs]


def test_the_trail_is_paginated_newest_first(
    http: httpx.Client, live_server_instance: LiveServer
) -> None:
    server = live_server_instance
    tenant = new_tenant("audit-pages")
    admin = make_key(server.app.state.db, server.settings, tenant=tenant)
    for n in range(5):
        response = http.delete(f"/v1/keys/key_{'q' * 19}{n}", headers=bearer(admin))
        assert response.status_code == 404
    pages, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        response = http.get("/v1/audit", params=params, headers=bearer(admin))
        assert response.status_code == 200
        pages.append(response.json()["items"])
        cursor = response.json()["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    objects = [e["object_id"] for page in pages for e in page]
    assert objects == [f"key_{'q' * 19}{n}" for n in (4, 3, 2, 1, 0)]  # newest first
    response = http.get("/v1/audit", params={"cursor": "nonsense"}, headers=bearer(admin))
    assert (response.status_code, response.json()["error"]["code"]) == (400, "invalid_cursor")
    response = http.get("/v1/audit", params={"limit": 0}, headers=bearer(admin))
    assert response.status_code == 422


def test_a_failed_audit_write_does_not_fail_the_call(
    http: httpx.Client,
    live_server_instance: LiveServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = live_server_instance
    admin = make_key(server.app.state.db, server.settings, tenant=new_tenant("audit-down"))

    def broken(*_: object) -> None:
        raise RuntimeError("the audit table is gone")

    monkeypatch.setattr(audit, "record", broken)
    with caplog.at_level(logging.WARNING, logger="service.audit_middleware"):
        response = http.post("/v1/keys", json={"scopes": ["predict"]}, headers=bearer(admin))
    assert response.status_code == 201, response.text
    warnings = [r for r in caplog.records if r.name == "service.audit_middleware"]
    assert [r.getMessage() for r in warnings] == ["audit: could not record POST /v1/keys -> 201"]
    assert admin not in caplog.text and response.json()["key"] not in caplog.text
