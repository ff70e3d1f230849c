"""The ingest worker's function (worker.ingest.run_ingest) on SQLite and the local store, with
the embedded broker: how a dataset ends when its stored upload is gone, and that a duplicate
message for an ingested dataset changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service import datasets
from service.broker import Broker
from service.db import Database, migrate
from service.settings import Settings
from service.storage import Storage
from service.tables import Dataset
from tests.imagegen import make_archive, make_image_folder
from worker.ingest import run_ingest


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Database, Storage, Settings, Broker, Path]]:
    url = f"sqlite:///{tmp_path / 'bitserve.db'}"
    migrate(url)
    settings = Settings(home=tmp_path / "home", database_url=url)
    archive = make_archive(make_image_folder(tmp_path / "images", {"a": 3, "b": 3}))
    db, broker = Database(url), Broker(settings)
    yield db, Storage(settings.artifact_root), settings, broker, archive
    broker.close()
    db.dispose()


def accept(world: tuple[Database, Storage, Settings, Broker, Path]) -> str:
    db, storage, settings, broker, archive = world
    copy = storage.upload_tmp() / "upload.zip"
    copy.write_bytes(archive.read_bytes())
    row = datasets.accept_upload(
        db, storage, broker, settings, copy, "zip", name="d", size=1, tenant_id=None
    )
    return row.id


def row_of(db: Database, dataset_id: str) -> Dataset:
    with db.sessionmaker() as session:
        row = session.get(Dataset, dataset_id)
        assert row is not None
        return row


def test_a_missing_upload_fails_the_dataset_at_once(
    world: tuple[Database, Storage, Settings, Broker, Path],
) -> None:
    db, storage, *_ = world
    dataset_id = accept(world)
    storage.remove(storage.shared_dir("uploads", dataset_id))  # e.g. a sweep run too eagerly
    assert run_ingest(dataset_id, world[2]) == "failed"
    row = row_of(db, dataset_id)
    assert (row.status, row.error_code, row.attempts) == ("failed", "ingest_failed", 1)
    assert row.error_details == {"reason": "ObjectMissing"}
    assert row.error_message == (
        "the uploaded archive is missing or damaged in the server's store; upload it again"
    )
    assert not storage.dataset_dir(dataset_id).exists()


def test_a_duplicate_message_after_ingestion_changes_nothing(
    world: tuple[Database, Storage, Settings, Broker, Path],
) -> None:
    db, storage, settings, *_ = world
    dataset_id = accept(world)
    assert run_ingest(dataset_id, settings) == "ready"
    before = row_of(db, dataset_id)
    assert run_ingest(dataset_id, settings) == "ready"  # the claim refuses: it is ready
    after = row_of(db, dataset_id)
    assert (after.status, after.attempts, after.num_images) == ("ready", 1, 6)
    assert after.finished_at == before.finished_at
    assert (storage.dataset_dir(dataset_id) / "index.json").is_file()
    assert not storage.shared_dir("uploads", dataset_id).exists()
    assert run_ingest("ds_aaaaaaaaaaaaaaaaaaaa", settings) == "not_found"
