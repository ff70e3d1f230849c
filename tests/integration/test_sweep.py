"""The sweep of orphaned objects on PostgreSQL, with a bucket on moto's S3 server and with the
local store, the latter through the `bitserve storage sweep` command in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from service.db import Database
from service.ids import new_id
from service.job_states import JobStatus
from service.object_store import S3Store
from service.storage import Storage
from service.sweep import sweep
from service.tables import Dataset, Job, Model
from tests.moto_s3 import AWS_ENV, moto_server, new_bucket

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(migrated_db: str) -> Iterator[Database]:
    database = Database(migrated_db)
    yield database
    database.dispose()


def add_rows(db: Database, datasets: list[str], models: list[str], jobs: dict[str, str]) -> None:
    with db.session() as session:
        for dataset_id in datasets:
            session.add(
                Dataset(
                    id=dataset_id,
                    name="d",
                    num_images=1,
                    num_classes=1,
                    classes=[],
                    image_size={},
                    rejected=[],
                    bytes=1,
                    storage_key=f"datasets/{dataset_id}",
                )
            )
        for model_id in models:
            session.add(
                Model(
                    id=model_id,
                    base_model="tiny-R10x0.25",
                    classes=["a"],
                    plan={},
                    metrics=None,
                    input={},
                    storage_key=f"models/{model_id}",
                )
            )
        for job_id, status in jobs.items():
            session.add(Job(id=job_id, base_model="tiny-R10x0.25", status=status, plan={}))


def make_folder(root: Path, kind: str, object_id: str, size: int) -> Path:
    path = root / kind / object_id
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "data.bin").write_bytes(b"x" * size)
    return path


def age(path: Path, seconds: float) -> None:
    stamp = time.time() - seconds
    for item in (path, *path.rglob("*")):
        os.utime(item, (stamp, stamp))


def test_sweep_of_a_bucket(db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with moto_server(tmp_path) as endpoint:
        for name, value in {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(name, value)
        bucket = new_bucket()
        storage = Storage(tmp_path / "node", S3Store(bucket, "pfx"))
        old = {
            "ds_live": new_id("ds"),
            "ds_orphan": new_id("ds"),
            "mdl_live": new_id("mdl"),
            "mdl_orphan": new_id("mdl"),
            "job_running": new_id("job"),
            "job_succeeded": new_id("job"),
            "job_gone": new_id("job"),
        }
        young = {"ds_young": new_id("ds"), "mdl_young": new_id("mdl")}
        kinds = {"ds": "datasets", "mdl": "models", "job": "jobs"}
        sizes = {label: 100 + i for i, label in enumerate([*old, *young])}

        def publish(label: str, object_id: str) -> None:
            kind = kinds[label.split("_")[0]]
            local = make_folder(tmp_path / "src", kind, object_id, sizes[label])
            storage.objects.publish(f"{kind}/{object_id}", local)

        for label, object_id in old.items():
            publish(label, object_id)
        # An upload whose manifest was never written: an orphan all the same.
        s3 = boto3.session.Session().client("s3")
        half = new_id("ds")
        s3.put_object(Bucket=bucket, Key=f"pfx/datasets/{half}/files/a.png", Body=b"p" * 9)
        # Not a bitserve id: never touched.
        s3.put_object(Bucket=bucket, Key="pfx/models/readme/notes.txt", Body=b"n")
        # This node's cached copy of an orphan goes too.
        make_folder(storage.root, "models", old["mdl_orphan"], 5)
        add_rows(
            db,
            [old["ds_live"]],
            [old["mdl_live"], young["mdl_young"]],
            {old["job_running"]: JobStatus.RUNNING, old["job_succeeded"]: JobStatus.SUCCEEDED},
        )
        # S3 times are whole seconds: 4 s between the old and the young folders, a 2.5 s limit.
        time.sleep(4.0)
        for label, object_id in young.items():
            publish(label, object_id)

        def orphan(label: str, reason: str) -> tuple[str, str, str, int]:
            """An orphan of the old ones: its bytes are its file's and its manifest's."""
            kind = kinds[label.split("_")[0]]
            key = f"pfx/{kind}/{old[label]}.manifest.json"
            manifest = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            return (kind, old[label], reason, sizes[label] + len(manifest))

        expected = {
            orphan("ds_orphan", "no row"),
            ("datasets", half, "no row", 9),
            orphan("mdl_orphan", "no row"),
            orphan("job_succeeded", "job succeeded"),
            orphan("job_gone", "no row"),
        }
        keys_before = bucket_keys(s3, bucket)
        with db.sessionmaker() as session:
            dry = sweep(storage, session, min_age_seconds=2.5, dry_run=True)
        assert {(o.kind, o.name, o.reason, o.bytes) for o in dry.removed} == expected
        assert bucket_keys(s3, bucket) == keys_before  # a dry run deletes nothing

        with db.sessionmaker() as session:
            report = sweep(storage, session, min_age_seconds=2.5)
        assert {(o.kind, o.name, o.reason, o.bytes) for o in report.removed} == expected
        assert report.failed == []
        gone = {name for _, name, _, _ in expected}
        assert {folder_of(key) for key in bucket_keys(s3, bucket)} == (
            {*old.values(), *young.values(), "readme"} - gone
        )
        assert not (storage.root / "models" / old["mdl_orphan"]).exists()
        # Nothing is left to sweep.
        with db.sessionmaker() as session:
            assert sweep(storage, session, min_age_seconds=2.5).removed == []


def bucket_keys(s3: object, bucket: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)  # type: ignore[attr-defined]
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def folder_of(key: str) -> str:
    rest = key.split("/", 2)[2]  # pfx/<kind>/<rest>
    return rest.split("/", 1)[0].removesuffix(".manifest.json")


def test_sweep_command_on_the_local_store(db: Database, migrated_db: str, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    live_ds, orphan_ds, young_ds = new_id("ds"), new_id("ds"), new_id("ds")
    live_mdl, orphan_mdl = new_id("mdl"), new_id("mdl")
    queued_job, failed_job, gone_job = new_id("job"), new_id("job"), new_id("job")
    old = {
        ("datasets", live_ds): 10,
        ("datasets", orphan_ds): 11,
        ("models", live_mdl): 12,
        ("models", orphan_mdl): 13,
        ("jobs", queued_job): 14,
        ("jobs", failed_job): 15,
        ("jobs", gone_job): 16,
    }
    for (kind, object_id), size in old.items():
        age(make_folder(root, kind, object_id, size), 2 * 3600)
    make_folder(root, "datasets", young_ds, 17)  # being ingested: no row yet, too young
    uploads = root / "tmp"
    uploads.mkdir()
    (uploads / "dead.zip").write_bytes(b"u" * 18)
    age(uploads / "dead.zip", 2 * 3600)
    (uploads / "live.zip").write_bytes(b"u" * 19)
    add_rows(
        db, [live_ds], [live_mdl], {queued_job: JobStatus.QUEUED, failed_job: JobStatus.FAILED}
    )
    env = {
        **os.environ,
        "BITSERVE_HOME": str(tmp_path / "home"),
        "BITSERVE_ARTIFACT_ROOT": str(root),
        "BITSERVE_DATABASE_URL": migrated_db,
    }
    env.pop("BITSERVE_STORAGE_URL", None)

    def run(*args: str) -> tuple[list[list[str]], str]:
        """The table's rows (split, without the age column) and its summary line."""
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "storage", "sweep", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        return [row[:3] + row[4:] for row in map(str.split, lines[1:-1])], lines[-1]

    # By kind (datasets, models, jobs), then by id; then this node's dead uploads.
    swept = [
        ["datasets", orphan_ds, "11", "no", "row"],
        ["models", orphan_mdl, "13", "no", "row"],
        *sorted(
            [["jobs", failed_job, "15", "job", "failed"], ["jobs", gone_job, "16", "no", "row"]]
        ),
        ["tmp", "dead.zip", "18", "dead", "upload"],
    ]
    assert run("--dry-run") == (  # the default min age: an hour
        swept,
        "would remove 5 folders and uploads, 73 bytes (older than 3600 s)",
    )
    assert all((root / kind / object_id).is_dir() for kind, object_id in old)
    assert (uploads / "dead.zip").is_file()

    assert run("--min-age", "3000") == (
        swept,
        "removed 5 folders and uploads, 73 bytes (older than 3000 s)",
    )
    remaining = {p.relative_to(root).as_posix() for p in root.glob("*/*")}
    assert remaining == {
        f"datasets/{live_ds}",
        f"datasets/{young_ds}",
        f"models/{live_mdl}",
        f"jobs/{queued_job}",
        "tmp/live.zip",
    }
