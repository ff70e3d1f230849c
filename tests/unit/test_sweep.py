"""The sweep's pure parts: which folders are orphans, the key parsing of an S3 listing, the
local store's listing, dead uploads, the report (service.sweep; the whole sweep on PostgreSQL,
moto's S3 server and the CLI: tests/integration/test_sweep.py)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from service.cli import _parser
from service.db import Database
from service.ids import new_id
from service.job_states import JobStatus
from service.object_store import LocalStore, ObjectStoreError, StoredFolder, folder_of_key
from service.settings import Settings
from service.storage import Storage
from service.sweep import Orphan, SweepReport, dead_uploads, format_report, select_orphans
from worker.reconciler import sweep_once

NOW = 1_000_000.0
HOUR = 3600.0


def folder(name: str, age: float, size: int = 10) -> StoredFolder:
    return StoredFolder(name, size, NOW - age)


def test_only_old_folders_without_a_row_are_dataset_and_model_orphans() -> None:
    live, orphan, young, at_limit = (new_id("ds") for _ in range(4))
    folders = [
        folder(live, 2 * HOUR),
        folder(orphan, 2 * HOUR, size=77),
        folder(young, HOUR - 1),
        folder(at_limit, HOUR),
        folder(new_id("mdl"), 2 * HOUR),  # not a dataset id: never ours to delete here
        folder("notes", 2 * HOUR),
    ]
    found = select_orphans("datasets", folders, {live: None}, NOW, HOUR)
    assert found == [
        Orphan("datasets", orphan, 77, 2 * HOUR, "no row"),
        Orphan("datasets", at_limit, 10, HOUR, "no row"),
    ]


def test_a_jobs_folder_is_an_orphan_once_its_job_ended_or_its_row_is_gone() -> None:
    ids = {status: new_id("job") for status in JobStatus}
    gone = new_id("job")
    folders = [folder(job_id, 2 * HOUR) for job_id in (*ids.values(), gone)]
    found = select_orphans("jobs", folders, {ids[s]: s for s in JobStatus}, NOW, HOUR)
    assert [(o.name, o.reason) for o in found] == [
        (ids[JobStatus.SUCCEEDED], "job succeeded"),
        (ids[JobStatus.FAILED], "job failed"),
        (ids[JobStatus.CANCELLED], "job cancelled"),
        (gone, "no row"),
    ]


def test_an_evaluations_thumbnails_go_with_its_row() -> None:
    kept, gone = new_id("eval"), new_id("eval")
    folders = [folder(kept, 2 * HOUR), folder(gone, 2 * HOUR), folder(new_id("mdl"), 2 * HOUR)]
    found = select_orphans("evaluations", folders, {kept: None}, NOW, HOUR)
    assert [(o.kind, o.name, o.reason) for o in found] == [("evaluations", gone, "no row")]


def test_an_upload_is_kept_while_its_dataset_is_processing_and_a_failed_dataset_goes() -> None:
    ids = {status: new_id("ds") for status in ("processing", "ready", "failed")}
    gone = new_id("ds")
    folders = [folder(dataset_id, 2 * HOUR) for dataset_id in (*ids.values(), gone)]
    rows: dict[str, str | None] = {dataset_id: status for status, dataset_id in ids.items()}
    uploads = select_orphans("uploads", folders, rows, NOW, HOUR)
    assert [(o.kind, o.name, o.reason) for o in uploads] == [
        ("uploads", ids["ready"], "dataset ready"),  # ingested: its archive is no longer read
        ("uploads", ids["failed"], "dataset failed"),
        ("uploads", gone, "no row"),
    ]
    found = select_orphans("datasets", folders, rows, NOW, HOUR)
    assert [(o.name, o.reason) for o in found] == [
        (ids["failed"], "dataset failed"),
        (gone, "no row"),
    ]


@pytest.mark.parametrize(
    ("rest", "name"),
    [
        ("ds_a/files/x.png", "ds_a"),
        ("ds_a/index.json", "ds_a"),
        ("ds_a.manifest.json", "ds_a"),
        ("ds_a", None),  # a bare object beside the folders: no folder of ours
        (".manifest.json", None),
        ("/x", None),
    ],
)
def test_an_s3_key_belongs_to_the_folder_named_before_its_first_slash(
    rest: str, name: str | None
) -> None:
    assert folder_of_key(rest) == name


def test_the_local_store_lists_folders_with_their_size_and_newest_mtime(tmp_path: Path) -> None:
    a, b = new_id("mdl"), new_id("mdl")
    (tmp_path / "models" / a / "sub").mkdir(parents=True)
    (tmp_path / "models" / a / "model.bin").write_bytes(b"x" * 100)
    (tmp_path / "models" / a / "sub" / "meta.json").write_bytes(b"y" * 23)
    (tmp_path / "models" / b).mkdir()
    (tmp_path / "models" / ".fetch-staging").mkdir()  # hidden: not a folder of the store
    (tmp_path / "models" / "stray.txt").write_text("not a folder")
    for path in (tmp_path / "models").rglob("*"):
        os.utime(path, (5000.0, 5000.0))
    os.utime(tmp_path / "models" / a, (5000.0, 5000.0))
    os.utime(tmp_path / "models" / b, (7000.0, 7000.0))
    os.utime(tmp_path / "models" / a / "sub" / "meta.json", (9000.0, 9000.0))  # newest inside
    assert sorted(LocalStore(tmp_path).list_folders("models"), key=lambda f: f.name) == sorted(
        [StoredFolder(a, 123, 9000.0), StoredFolder(b, 0, 7000.0)], key=lambda f: f.name
    )
    assert LocalStore(tmp_path).list_folders("jobs") == []  # no jobs/ yet


def test_a_storage_always_lists_its_own_root(tmp_path: Path) -> None:
    with pytest.raises(ObjectStoreError, match="without its root"):
        LocalStore().list_folders("datasets")
    (tmp_path / "datasets" / "ds_x").mkdir(parents=True)
    # Storage gives a root-less local store its own root (open_store(None) makes one so).
    for objects in (None, LocalStore()):
        assert [f.name for f in Storage(tmp_path, objects).objects.list_folders("datasets")] == [
            "ds_x"
        ]


def test_uploads_untouched_past_the_min_age_are_dead(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    tmp = storage.upload_tmp()
    (tmp / "old.zip").write_bytes(b"z" * 40)
    (tmp / "new.zip").write_bytes(b"z" * 50)
    (tmp / "old-dir").mkdir()
    (tmp / "old-dir" / "part").write_bytes(b"z" * 5)
    for path in (tmp / "old.zip", tmp / "old-dir", tmp / "old-dir" / "part"):
        os.utime(path, (NOW - 2 * HOUR, NOW - 2 * HOUR))
    os.utime(tmp / "new.zip", (NOW - 60, NOW - 60))
    assert dead_uploads(storage, NOW, HOUR) == [
        Orphan("tmp", "old-dir", 5, 2 * HOUR, "dead upload"),
        Orphan("tmp", "old.zip", 40, 2 * HOUR, "dead upload"),
    ]
    assert dead_uploads(Storage(tmp_path / "empty"), NOW, HOUR) == []


def test_the_report_is_a_table_with_the_bytes_freed_and_the_failures() -> None:
    report = SweepReport(dry_run=True, min_age_seconds=3600.0)
    report.removed = [
        Orphan("datasets", "ds_aaaa", 1000, 7200.4, "no row"),
        Orphan("jobs", "job_bbbb", 24, 3600.0, "job failed"),
    ]
    assert report.bytes_freed == 1024
    lines = format_report(report).splitlines()
    assert lines[0].split() == ["kind", "id", "bytes", "age", "(s)", "reason"]
    assert lines[1].split() == ["datasets", "ds_aaaa", "1000", "7200", "no", "row"]
    assert lines[2].split() == ["jobs", "job_bbbb", "24", "3600", "job", "failed"]
    assert lines[3] == "would remove 2 folders and uploads, 1024 bytes (older than 3600 s)"
    report.dry_run = False
    report.failed = [(Orphan("models", "mdl_cccc", 5, 9000.0, "no row"), "object store: denied")]
    assert format_report(report).splitlines()[3:] == [
        "removed 2 folders and uploads, 1024 bytes (older than 3600 s)",
        "FAILED models/mdl_cccc: object store: denied",
    ]


def test_the_storage_sweep_command_line() -> None:
    args = _parser().parse_args(["storage", "sweep"])
    assert (args.command, args.storage_command, args.dry_run, args.min_age) == (
        "storage",
        "sweep",
        False,
        None,
    )
    args = _parser().parse_args(["storage", "sweep", "--dry-run", "--min-age", "90"])
    assert (args.dry_run, args.min_age) == (True, 90.0)
    with pytest.raises(SystemExit):
        _parser().parse_args(["storage"])  # the action is required


def test_the_reconcilers_sweep_removes_old_orphans_and_logs_them(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(home=tmp_path, sweep_interval_seconds=60, sweep_min_age_seconds=HOUR)
    root = settings.artifact_root
    orphan, young = new_id("job"), new_id("job")
    for job_id in (orphan, young):
        (root / "jobs" / job_id).mkdir(parents=True)
        (root / "jobs" / job_id / "state.pt").write_bytes(b"s" * 30)
    old = time.time() - 2 * HOUR
    for path in (root / "jobs" / orphan, root / "jobs" / orphan / "state.pt"):
        os.utime(path, (old, old))
    with caplog.at_level(logging.WARNING, logger="worker.reconciler"):
        report = sweep_once(settings, db)
    assert report is not None
    assert [(o.kind, o.name, o.bytes, o.reason) for o in report.removed] == [
        ("jobs", orphan, 30, "no row")
    ]
    assert sorted(p.name for p in (root / "jobs").iterdir()) == [young]
    assert "removed 1 orphaned folders and uploads (30 bytes); 0 refused" in caplog.text
