"""No API key is ever logged, stored in clear or repeated in an answer (docs/security.md).

The whole loop runs over real HTTP with keys in both headers: upload, a job trained by a real
Celery worker, Server-Sent Events, predict, download, a key made over REST, refused calls with
revoked, expired, mangled and misplaced keys, deletes. Meanwhile every logger of the gateway
is captured at DEBUG (SQLAlchemy's statements and their parameters included), uvicorn's access
and error logs with them, plus everything written to stdout/stderr and the worker process's
own output. No key, nor its secret part, may appear in any of it, nor in any answer, nor in
the audit table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from service import api_keys
from service.api_keys import Scope
from service.ids import utcnow
from tests.e2e.loop import run_loop
from tests.integration.conftest import JobServer, make_key

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


@pytest.fixture
def everything_logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog at DEBUG for every logger: those that set their own level (SQLAlchemy's are at
    WARNING) turned down to DEBUG, and uvicorn's, which do not propagate, captured directly."""
    names = {*logging.root.manager.loggerDict, *UVICORN_LOGGERS}
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in names]
    for logger, level in saved:
        if level != logging.NOTSET:
            logger.setLevel(logging.DEBUG)
    for name in UVICORN_LOGGERS:
        logging.getLogger(name).addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG)
    try:
        yield caplog
    finally:
        for name in UVICORN_LOGGERS:
            logging.getLogger(name).removeHandler(caplog.handler)
        for logger, level in saved:
            logger.setLevel(level)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_no_key_reaches_a_log_an_answer_or_the_worker(
    job_server: JobServer,
    tmp_path: Path,
    everything_logged: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    server, worker = job_server.server, job_server.worker
    db, settings = server.app.state.db, server.settings
    tenant = "secrecy"
    trainer = make_key(db, settings, tenant=tenant, scopes=(Scope.TRAIN, Scope.PREDICT))
    admin = make_key(db, settings, tenant=tenant)
    predict_only = make_key(db, settings, tenant=tenant, scopes=(Scope.PREDICT,))
    outsider = make_key(db, settings, tenant="secrecy-other")
    revoked = make_key(db, settings, tenant=tenant)
    with db.sessionmaker() as session:
        api_keys.revoke_key(session, None, f"key_{revoked[4:24]}")
    expired = make_key(
        db, settings, tenant=tenant, now=utcnow() - timedelta(days=2), expires_in=timedelta(1)
    )
    keys = [trainer, admin, predict_only, outsider, revoked, expired, server.key]
    answers: list[httpx.Response] = []

    # The loop: upload, a job a real worker trains, its events, predictions (Bearer).
    with httpx.Client(base_url=server.url, timeout=60, headers=bearer(trainer)) as client:
        try:
            result = run_loop(client, tmp_path)
        except AssertionError:
            print(worker.log()[-4000:])
            raise
    model_id, dataset_id = result.model["id"], result.dataset["id"]

    with httpx.Client(base_url=server.url, timeout=60) as http:
        # The key in X-API-Key: a download.
        download = http.get(f"/v1/models/{model_id}/artifact", headers={"X-API-Key": trainer})
        assert download.status_code == 200 and download.content[:2] == b"PK"
        # A key made over REST: its secret is in that one answer, and must be nowhere else.
        made = http.post("/v1/keys", json={"scopes": ["predict"]}, headers=bearer(admin))
        assert made.status_code == 201, made.text
        keys.append(made.json()["key"])
        assert http.get("/v1/models", headers=bearer(keys[-1])).status_code == 200

        # Refused calls, each key presented as a client would.
        job = {"dataset_id": dataset_id, "base_model": "tiny-R10x0.25"}
        mangled = [trainer[:-4] + "AAAA", trainer + "x", f"{trainer} {trainer}", trainer[4:]]
        for key in (revoked, expired, *mangled):
            answers.append(http.get("/v1/datasets", headers=bearer(key)))
            answers.append(http.post("/v1/jobs", json=job, headers={"X-API-Key": key}))
            answers.append(http.delete(f"/v1/models/{model_id}", headers=bearer(key)))
        assert {a.status_code for a in answers} == {401}
        keys += mangled
        refused = [
            http.get("/v1/datasets", headers={"Authorization": f"Token {trainer}"}),  # 401
            http.get("/v1/datasets", headers={"Authorization": trainer}),  # 401
            http.post("/v1/jobs", json=job, headers=bearer(predict_only)),  # 403
            http.delete(f"/v1/datasets/{dataset_id}", headers=bearer(predict_only)),  # 403
            http.get(f"/v1/models/{model_id}", headers=bearer(outsider)),  # 404
            http.delete(f"/v1/models/{model_id}", headers=bearer(outsider)),  # 404
            http.post(  # 400: refused before the key is looked at
                "/v1/jobs",
                content=b"{",
                headers={"Content-Type": "application/json", **bearer(trainer)},
            ),
            http.post("/v1/jobs", json={"base_model": 3}, headers=bearer(trainer)),  # 422
            http.get("/v1/nowhere", headers=bearer(trainer)),  # 404
        ]
        assert [a.status_code for a in refused] == [401, 401, 403, 403, 404, 404, 400, 422, 404]
        answers += refused

        # And the deletes, with the owner's key.
        assert http.delete(f"/v1/models/{model_id}", headers=bearer(trainer)).status_code == 204
        response = http.delete(f"/v1/datasets/{dataset_id}", headers={"X-API-Key": trainer})
        assert response.status_code == 204
        trail = http.get("/v1/audit", params={"limit": 100}, headers=bearer(admin)).json()

    # The captures really hold the run: access log, audit lines, SQL, the worker's training.
    logged = everything_logged.text
    assert '"POST /v1/jobs HTTP/1.1" 202' in logged
    assert f"audit tenant={tenant} key=key_{trainer[4:24]} POST /v1/jobs -> 202" in logged
    assert "SELECT api_keys." in logged
    worker_log = worker.log()
    assert result.job["id"] in worker_log
    assert {e["route"] for e in trail["items"]} >= {"/v1/jobs", "/v1/models/{model_id}"}

    out, err = capfd.readouterr()
    arguments = "\n".join(repr(r.args) for r in everything_logged.records)
    with db.sessionmaker() as session:
        audit_rows = "\n".join(map(str, session.execute(sa.text("SELECT * FROM audit_events"))))
    places = {
        "the gateway's log": logged,
        "the log records' arguments": arguments,
        "stdout/stderr": out + err,
        "the worker's output": worker_log,
        "the audit table": audit_rows,
    }
    places |= {
        f"answer {i} ({a.request.method} {a.request.url.path} -> {a.status_code})": (
            a.text + str(a.headers)
        )
        for i, a in enumerate(answers)
    }
    # Each key as presented, and any 12 characters of a real key's secret (72 random bits:
    # never found by chance; the key id before it is no secret).
    secrets = [key[25:] for key in keys if len(key) == 68 and key.startswith("bsk_")]
    parts = {*keys, *(fragment for secret in secrets for fragment in fragments(secret))}
    leaks = [
        f"{part!r} in {where}" for part in parts for where, text in places.items() if part in text
    ]
    assert leaks == []


def fragments(secret: str, width: int = 12) -> list[str]:
    return [secret[i : i + width] for i in range(len(secret) - width + 1)]
