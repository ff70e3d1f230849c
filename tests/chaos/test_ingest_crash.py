"""An ingest worker is SIGKILLed mid-ingestion of a larger archive (thousands of images, so
ingestion takes seconds): the dataset stays `processing`, held by a dead worker, until its
heartbeat goes stale; then another worker's reconciler gives it back to the queue, that worker
ingests it again from the stored archive, and it ends ready as attempt 2, with every image and
nothing of the first attempt left over.

The server, both workers and the database are this test's own (a fresh PostgreSQL database):
no other test's reconciler can take the dataset meanwhile. The recovery time (kill -> ready) is
printed: about job_stale_after_seconds + reconcile_interval_seconds + one ingestion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.db import Database, migrate
from service.storage import Storage
from service.tables import Dataset
from tests.chaos.recovery_fixtures import wait_until
from tests.imagegen import make_archive, make_image_folder
from tests.integration.conftest import LiveServer, start_server  # noqa: F401
from tests.integration.datasets_helpers import post_archive
from tests.integration.worker_fixtures import WorkerProcess, fast_job_settings
from tests.services import create_database, drop_database

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

IMAGES_PER_CLASS = 1500  # ~3000 PNGs: several seconds of extracting and indexing
STALE_S = 3.0
RECONCILE_S = 1.0
MID_INGESTION_TIMEOUT_S = 60.0
RECOVERY_TIMEOUT_S = 90.0


@pytest.fixture
def database_url(postgres_admin_url: str) -> Iterator[str]:
    url, name = create_database(postgres_admin_url)
    migrate(url)
    yield url
    drop_database(postgres_admin_url, name)


def test_a_killed_ingest_worker_is_repaired_by_the_reconciler(
    tmp_path: Path,
    database_url: str,
    redis_url: str,
    start_server: Callable[..., LiveServer],  # noqa: F811
) -> None:
    settings = fast_job_settings(
        tmp_path,
        database_url=database_url,
        broker_url=redis_url,
        job_stale_after_seconds=STALE_S,
        reconcile_interval_seconds=RECONCILE_S,
    )
    server = start_server(settings)
    folder = make_image_folder(
        tmp_path / "many", {"a": IMAGES_PER_CLASS, "b": IMAGES_PER_CLASS}, size=(32, 32)
    )
    archive = make_archive(folder)
    storage = Storage(settings.artifact_root)
    db = Database(database_url)
    http = httpx.Client(base_url=server.url, headers=server.headers, timeout=30)

    def dataset() -> dict[str, Any]:
        response = http.get(f"/v1/datasets/{dataset_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def row() -> Dataset:
        with db.sessionmaker() as session:
            found = session.get(Dataset, dataset_id)
            assert found is not None
            return found

    try:
        first = WorkerProcess(settings, roles=("ingest",)).start()
        try:
            response = post_archive(http, archive, filename="many.zip")
            assert response.status_code == 202, response.text
            dataset_id = response.json()["id"]

            def mid_ingestion() -> bool:
                progress = dataset()["progress"] or {}
                done, total = progress.get("done", 0), progress.get("total", 0)
                return progress.get("phase") == "indexing" and 0 < done < total

            wait_until(mid_ingestion, MID_INGESTION_TIMEOUT_S, "mid-ingestion", first.log)
            at_kill = dataset()["progress"]
            first.kill()  # SIGKILL: no cleanup, no release; the row still names it
            killed = time.monotonic()
        finally:
            first.kill()
        held = row()
        assert (held.status, held.attempts) == ("processing", 1)
        assert held.worker_id is not None
        assert (storage.root / "uploads" / dataset_id).is_dir()  # the archive is kept

        with WorkerProcess(settings, roles=("ingest",)) as second:
            started = time.monotonic() - killed  # the new worker is up (it takes seconds)
            wait_until(lambda: row().attempts == 2, RECOVERY_TIMEOUT_S, "taken again", second.log)
            requeued = time.monotonic() - killed
            wait_until(
                lambda: dataset()["status"] != "processing",
                RECOVERY_TIMEOUT_S,
                "ingested again",
                second.log,
            )
            ready = time.monotonic() - killed
            log = second.log()
        final = dataset()
    finally:
        http.close()
        db.dispose()
    print(
        f"\ningest worker SIGKILLed at {at_kill} ({2 * IMAGES_PER_CLASS} images); seconds after "
        f"the kill: other worker up {started:.1f}, dataset taken again (attempt 2) "
        f"{requeued:.1f} (stale after {STALE_S:g} s, reconcile every {RECONCILE_S:g} s), "
        f"ready {ready:.1f}"
    )
    assert final["status"] == "ready", (final, log[-4000:])
    assert final["num_images"] == 2 * IMAGES_PER_CLASS
    assert final["classes"] == [
        {"name": "a", "count": IMAGES_PER_CLASS},
        {"name": "b", "count": IMAGES_PER_CLASS},
    ]
    assert final["progress"] is None and final["error"] is None
    assert row().attempts == 2
    assert f"requeued ['{dataset_id}']" in log
    assert f"dataset {dataset_id} ready: {2 * IMAGES_PER_CLASS} images" in log
    # The stored archive went once ingested; the dataset's folder is the second attempt's.
    assert not (storage.root / "uploads" / dataset_id).exists()
    assert (storage.dataset_dir(dataset_id) / "index.json").is_file()
