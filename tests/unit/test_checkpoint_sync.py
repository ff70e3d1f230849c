"""A job's training checkpoints through the object store (worker.checkpoints), on moto's S3
server: published in the background, only the latest kept, fetched verified on another node,
and a missing, damaged or unreachable one means starting from what is local, never a crash."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch

from bitcore.train import state
from bitcore.train.engine import STATE_DIR
from service.ids import new_id
from service.object_store import LocalStore, S3Store
from service.storage import Storage
from tests.moto_s3 import moto_server, new_bucket, use_endpoint
from worker.checkpoints import CheckpointPublisher, restore

FINGERPRINT = {"run": "test"}


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_server(tmp_path_factory.mktemp("moto")) as url:
        yield url


@pytest.fixture
def store(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    use_endpoint(monkeypatch, endpoint)
    return S3Store(new_bucket(), "bitserve")


def keys(store: S3Store) -> list[str]:
    listing = boto3.session.Session().client("s3").list_objects_v2(Bucket=store.bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def save(work_dir: Path, step: int, seed: int = 0) -> state.SavedState:
    """A real training checkpoint (model + SGD momentum) as the training loop writes it."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    state.save(work_dir / STATE_DIR, step, model, optimizer, FINGERPRINT)
    saved = state.latest(work_dir / STATE_DIR)
    assert saved is not None and saved.step == step
    return saved


def file_bytes(saved: state.SavedState) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(saved.path.iterdir())}


def test_the_latest_checkpoint_is_published_and_resumed_on_another_node(
    store: S3Store, tmp_path: Path
) -> None:
    job_id = new_id("job")
    node_a = Storage(tmp_path / "a", store)
    work_a = node_a.job_dir(job_id)
    publisher = CheckpointPublisher(node_a, job_id, work_a)
    save(work_a, 4, seed=1)
    started = time.perf_counter()
    publisher.submit(4)
    submit_seconds = time.perf_counter() - started
    newest = save(work_a, 8, seed=2)  # deletes step 4 locally while its upload may run
    publisher.submit(8)  # joins the step-4 upload first
    with publisher:
        pass
    assert publisher.published_step == 8 and len(publisher.seconds) == 2
    print(f"submit {submit_seconds * 1000:.1f} ms, uploads {publisher.seconds}")
    prefix = f"bitserve/jobs/{job_id}"
    # Only the latest checkpoint is kept; the snapshots beside state/ are gone.
    assert keys(store) == [
        f"{prefix}.manifest.json",
        f"{prefix}/step-00000008/state.json",
        f"{prefix}/step-00000008/state.safetensors",
    ]
    assert sorted(p.name for p in work_a.iterdir()) == [STATE_DIR]

    node_b = Storage(tmp_path / "b", store)
    work_b = node_b.job_dir(job_id)
    assert restore(node_b, job_id, work_b) == 8
    fetched = state.latest(work_b / STATE_DIR)
    assert fetched is not None and fetched.step == 8
    assert file_bytes(fetched) == file_bytes(newest)
    assert sorted(p.name for p in work_b.iterdir()) == [STATE_DIR]

    # A node whose own checkpoint is as advanced keeps it (nothing is replaced)...
    assert restore(node_a, job_id, work_a) is None
    # ... one with an older one takes the store's.
    node_c = Storage(tmp_path / "c", store)
    save(node_c.job_dir(job_id), 4, seed=3)
    assert restore(node_c, job_id, node_c.job_dir(job_id)) == 8
    taken = state.latest(node_c.job_dir(job_id) / STATE_DIR)
    assert taken is not None and file_bytes(taken) == file_bytes(newest)

    # The job ends: work dir and objects go.
    node_b.discard_job(job_id)
    assert not work_b.exists() and keys(store) == []


@pytest.mark.parametrize("damage", ["tampered", "missing", "unreachable"])
def test_an_unusable_remote_checkpoint_means_starting_over(
    store: S3Store, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = new_id("job")
    node_a = Storage(tmp_path / "a", store)
    with CheckpointPublisher(node_a, job_id, node_a.job_dir(job_id)) as publisher:
        save(node_a.job_dir(job_id), 6)
        publisher.submit(6)
    s3: Any = boto3.session.Session().client("s3")
    key = f"bitserve/jobs/{job_id}/step-00000006/state.safetensors"
    if damage == "tampered":
        s3.put_object(Bucket=store.bucket, Key=key, Body=b"\0" * 100)
    elif damage == "missing":
        s3.delete_object(Bucket=store.bucket, Key=key)
    node_b = Storage(
        tmp_path / "b", S3Store("no-such-bucket") if damage == "unreachable" else store
    )
    work_b = node_b.job_dir(job_id)
    with caplog.at_level(logging.WARNING, logger="worker.checkpoints"):
        assert restore(node_b, job_id, work_b) is None
    assert f"job {job_id}: its checkpoint in the object store is unusable" in caplog.text
    assert "starts at step 0" in caplog.text
    assert state.latest(work_b / STATE_DIR) is None
    assert not (work_b / ".fetched-state").exists()


def test_no_remote_checkpoint_starts_at_step_0(store: S3Store, tmp_path: Path) -> None:
    storage = Storage(tmp_path, store)
    job_id = new_id("job")
    assert restore(storage, job_id, storage.job_dir(job_id)) is None
    assert not (storage.job_dir(job_id) / STATE_DIR).exists()


def test_a_failed_upload_is_logged_and_training_goes_on(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    use_endpoint(monkeypatch, endpoint)
    storage = Storage(tmp_path, S3Store("no-such-bucket"))
    job_id = new_id("job")
    work = storage.job_dir(job_id)
    publisher = CheckpointPublisher(storage, job_id, work)
    save(work, 3)
    with caplog.at_level(logging.WARNING, logger="worker.checkpoints"), publisher:
        publisher.submit(3)
    assert publisher.published_step is None
    assert f"job {job_id}: publishing the checkpoint of step 3 failed" in caplog.text
    assert sorted(p.name for p in work.iterdir()) == [STATE_DIR]  # the snapshot is gone
    assert state.latest(work / STATE_DIR) is not None  # the local checkpoint stays
    storage.discard_job(job_id)  # a refused delete is logged, never raised
    assert not work.exists()


def test_the_local_store_copies_nothing(tmp_path: Path) -> None:
    storage = Storage(tmp_path, LocalStore())
    job_id = new_id("job")
    work = storage.job_dir(job_id)
    publisher = CheckpointPublisher(storage, job_id, work)
    save(work, 2)
    with publisher:
        publisher.submit(2)
    assert publisher.published_step is None and publisher.seconds == []
    assert sorted(p.name for p in work.iterdir()) == [STATE_DIR]
    assert restore(storage, job_id, work) is None
    assert state.latest(work / STATE_DIR) is not None
    storage.discard_job(job_id)
    assert not work.exists()
