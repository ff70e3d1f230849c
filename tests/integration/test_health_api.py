"""Health, readiness and metrics on the real app (real PostgreSQL, Redis, uvicorn)."""

from __future__ import annotations

import socket
import warnings
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.integration.conftest import LiveServer
from tests.model_fixtures import fixture_plan

pytestmark = pytest.mark.integration


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once the socket closes


def test_healthz(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_all_dependencies_up(client: httpx.Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ready"}


def test_readyz_names_the_broker_when_it_is_down(
    settings: Settings, start_server: Callable[..., LiveServer]
) -> None:
    down = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{_closed_port()}/0"})
    server = start_server(down)
    response = httpx.get(f"{server.url}/readyz", timeout=30)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    error = response.json()["error"]
    assert error["code"] == "not_ready"
    assert set(error["details"]["failing"]) == {"broker"}


def test_readyz_names_database_and_storage_when_they_fail(
    settings: Settings, start_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = settings.model_copy(
        update={
            "database_url": f"postgresql+psycopg://nobody@127.0.0.1:{_closed_port()}/none",
            "artifact_root": blocker / "store",  # cannot be created under a regular file
        }
    )
    server = start_server(bad, with_key=False)  # no database to keep a key in
    response = httpx.get(f"{server.url}/readyz", timeout=30)
    assert response.status_code == 503
    assert set(response.json()["error"]["details"]["failing"]) == {"database", "storage"}
    # Liveness does not depend on them.
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_metrics_count_requests_by_route_template(client: httpx.Client) -> None:
    for _ in range(3):
        assert client.get("/v1/datasets/ds_aaaaaaaaaaaaaaaaaaaa").status_code == 404
    text = client.get("/metrics").text
    before = _sample(text, 'method="GET",route="/v1/datasets/{dataset_id}",status="404"')
    assert client.get("/v1/datasets/ds_bbbbbbbbbbbbbbbbbbbb").status_code == 404
    text = client.get("/metrics").text
    assert (
        _sample(text, 'method="GET",route="/v1/datasets/{dataset_id}",status="404"') == before + 1
    )
    assert before >= 3
    assert "ds_aaaa" not in text  # raw paths never become labels
    assert 'bitserve_jobs{state="queued"}' in text
    assert "bitserve_database_up 1.0" in text
    assert "bitserve_predict_batch_size_bucket" in text


def _sample(text: str, labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("bitserve_http_requests_total{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no bitserve_http_requests_total sample with {labels}")


def test_errors_have_the_contract_shape(client: httpx.Client) -> None:
    response = client.get("/no/such/route")
    assert response.status_code == 404
    assert response.json() == {
        "error": {"code": "not_found", "message": "no such route or object", "details": {}}
    }
    response = client.put("/healthz")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    response = client.get("/v1/datasets", params={"limit": 0})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
    assert response.json()["error"]["details"]["errors"][0]["loc"] == ["query", "limit"]
    response = client.get("/v1/datasets", params={"cursor": "not-a-cursor"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_cursor"


def test_base_models_catalog(client: httpx.Client, settings: Settings) -> None:
    body = client.get("/v1/base-models").json()
    assert body["next_cursor"] is None  # the list shape of docs/api.md; the catalog is one page
    items = {m["name"]: m for m in body["items"]}
    assert len(items) == 14  # BiT-S/BiT-M x 6 sizes, and the two small unpublished variants
    r50 = items["BiT-M-R50x1"]
    assert r50["published"] is True and r50["requires_checkpoint"] is True
    assert r50["parameters"] == 25_549_352  # ResNet-50 v2 with a 1000-class head
    assert r50["upstream"] == "ImageNet-21k"
    assert r50["url"] == "https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz"
    assert r50["download_bytes"] == 273_026_636  # float32, 21843-class upstream head
    tiny = items["tiny-R10x0.25"]
    assert tiny["published"] is False and tiny["requires_checkpoint"] is False
    assert tiny["parameters"] == 1_017_464
    assert tiny["checkpoint_present"] is None and tiny["url"] is None

    assert r50["checkpoint_present"] is False
    path = settings.checkpoint_dir / "BiT-M-R50x1.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"placeholder")  # presence is a file check, not a load
    try:
        items = {m["name"]: m for m in client.get("/v1/base-models").json()["items"]}
        assert items["BiT-M-R50x1"]["checkpoint_present"] is True
        assert items["BiT-S-R50x1"]["checkpoint_present"] is False
    finally:
        path.unlink()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_migrations_match_the_tables(backend: str, migrated_db: str, tmp_path: Path) -> None:
    """Alembic's head schema is exactly what service.tables declares (no drift)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from service.db import Database, migrate
    from service.tables import Base

    url = migrated_db if backend == "postgresql" else f"sqlite:///{tmp_path}/m/bitserve.db"
    migrate(url)  # idempotent: a second upgrade to head is a no-op
    db = Database(url)
    try:
        with db.engine.connect() as conn:
            context = MigrationContext.configure(conn)
            assert context.get_current_revision() == "0010"  # 0010_job_deploy_to
            with warnings.catch_warnings():  # SQLite cannot reflect the expression index
                warnings.simplefilter("ignore")
                diff = compare_metadata(context, Base.metadata)
    finally:
        db.dispose()
    assert diff == []


def test_broker_check_supports_the_embedded_transport(tmp_path: Path) -> None:
    from service.routers.health import check_broker

    check_broker(f"sqla+sqlite:///{tmp_path}/broker.db")
    with pytest.raises(ValueError, match="unsupported broker URL scheme"):
        check_broker("amqp://guest@localhost//")


def test_metrics_report_jobs_and_heartbeats_from_the_database(
    client: httpx.Client, settings: Settings
) -> None:
    from datetime import timedelta

    import sqlalchemy as sa

    from service.db import Database
    from service.ids import new_id, utcnow
    from service.tables import Job

    db = Database(settings.database_url)
    worker = f"metrics-test-{new_id('w')}"
    job_id = new_id("job")
    try:
        with db.session() as session:
            session.add(
                Job(
                    id=job_id,
                    base_model="tiny-R10x0.25",
                    status="running",
                    plan=fixture_plan(32),
                    worker_id=worker,
                    heartbeat_at=utcnow() - timedelta(seconds=30),
                )
            )
        with db.session() as session:
            running = session.scalar(
                sa.select(sa.func.count()).select_from(Job).where(Job.status == "running")
            )
        text = client.get("/metrics").text
        assert f'bitserve_jobs{{state="running"}} {float(running or 0)}' in text
        line = next(t for t in text.splitlines() if f'worker="{worker}"' in t)
        assert 30.0 <= float(line.rsplit(" ", 1)[1]) < 40.0
    finally:
        with db.session() as session:
            job = session.get(Job, job_id)
            if job is not None:
                job.status = "failed"
        db.dispose()
    assert f'worker="{worker}"' not in client.get("/metrics").text
