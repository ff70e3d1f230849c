"""Resource faults with an injected ENOSPC (the chaos tests use a real full tmpfs): a full disk
is reported as such whichever writer hit it, leaves no partial file and registers nothing; out
of memory is told apart from bugs and answered with the micro-batch to try next.

ENOSPC is injected at the operating-system boundary (os.posix_fallocate, a writer that raises
what safetensors or torch.save raise), never by replacing the product's own code.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from bitcore.atomic import DiskFull, atomic_write, is_disk_full, reserve
from service import datasets
from service.broker import Broker
from service.db import Database, migrate
from service.settings import Settings
from service.storage import Storage
from service.tables import Dataset
from tests.imagegen import make_archive, make_image_folder
from worker.failures import is_out_of_memory, out_of_memory_message, resource_failure
from worker.ingest import run_ingest

SAFETENSORS_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"


def _no_space(*_: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        Exception(SAFETENSORS_ENOSPC),  # safetensors' SafetensorError: no errno, only words
    ],
)
def test_a_full_disk_in_an_atomic_write_is_disk_full_and_leaves_no_temp(
    tmp_path: Path, failure: Exception
) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(DiskFull) as caught, atomic_write(target) as tmp:
        tmp.write_bytes(b"half a fi")
        raise failure
    assert caught.value.errno in (errno.ENOSPC, errno.EDQUOT)
    assert is_disk_full(caught.value) and caught.value.__cause__ is failure
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert target.read_bytes() == b"old"


def test_other_write_errors_stay_what_they_are(tmp_path: Path) -> None:
    # torch.save's ENOSPC is a RuntimeError without words: told apart by the free space left,
    # and this disk has plenty.
    with pytest.raises(RuntimeError, match="unexpected pos"), atomic_write(tmp_path / "x"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576")
    with pytest.raises(PermissionError), atomic_write(tmp_path / "y"):
        raise PermissionError(errno.EACCES, "denied")
    assert list(tmp_path.iterdir()) == []
    assert not is_disk_full(ValueError("no space in this sentence"))


def test_reserve_turns_a_full_disk_into_an_error_instead_of_a_sigbus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reserve(tmp_path / "ok", 4096)
    assert (tmp_path / "ok").stat().st_size == 4096
    monkeypatch.setattr(os, "posix_fallocate", _no_space)
    with pytest.raises(DiskFull):
        reserve(tmp_path / "full", 4096)


def test_a_dataset_that_fills_the_disk_fails_insufficient_storage_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'bitserve.db'}"
    migrate(url)
    db = Database(url)
    settings = Settings(home=tmp_path / "home", database_url=url, min_images_per_class=2)
    storage = Storage(settings.artifact_root)
    broker = Broker(settings)  # the embedded SQLite broker: the message is really sent
    archive = make_archive(make_image_folder(tmp_path / "images", {"a": 3, "b": 3}))

    def accepted() -> str:
        copy = storage.upload_tmp() / "upload.zip"
        copy.write_bytes(archive.read_bytes())
        row = datasets.accept_upload(
            db, storage, broker, settings, copy, "zip", name="d", size=1, tenant_id=None
        )
        assert row.status == "processing"
        return row.id

    first = accepted()

    # The ingest worker's write of the rejected list hits a full disk (a text write raises
    # ENOSPC as the operating system reports it).
    def disk_full(*_: object, **__: object) -> None:
        _no_space()

    monkeypatch.setattr(Path, "write_text", disk_full)
    assert run_ingest(first, settings) == "failed"
    monkeypatch.undo()  # space again: the same upload works
    with db.sessionmaker() as session:
        row = session.get(Dataset, first)
        assert row is not None and row.status == "failed"
        assert row.error_code == "insufficient_storage"
        assert row.error_message is not None and "disk is full" in row.error_message
    assert not any((storage.root / "datasets").iterdir())  # the extracted files went too
    assert not any((storage.root / "uploads").iterdir())  # and the refused upload

    second = accepted()
    assert run_ingest(second, settings) == "ready"
    with db.sessionmaker() as session:
        row = session.get(Dataset, second)
        assert row is not None and (row.status, row.num_images) == ("ready", 6)
    broker.close()
    db.dispose()


def test_out_of_memory_is_told_apart_from_bugs() -> None:
    with pytest.raises(RuntimeError) as real:  # what torch raises on the CPU
        torch.empty(1 << 50, dtype=torch.uint8)
    assert is_out_of_memory(real.value)
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to ..."))
    wrapped = RuntimeError("DataLoader worker failed")
    wrapped.__cause__ = MemoryError()
    assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert resource_failure(RuntimeError("a bug"), {}) is None


@pytest.mark.parametrize(
    ("plan", "used", "next_size"),
    [
        ({"batch_size": 64, "micro_batch_size": 64, "crop": 384}, "64 at", 32),
        ({"batch_size": 48, "micro_batch_size": 48, "crop": 128}, "48 at", 24),
        ({"batch_size": 512, "micro_batch_size": None, "crop": 128}, "32 (chosen", 16),
        ({"batch_size": 12, "micro_batch_size": 12, "crop": 128}, "12 at", 6),
    ],
)
def test_the_out_of_memory_message_names_a_smaller_micro_batch(
    plan: dict[str, object], used: str, next_size: int
) -> None:
    code, message = resource_failure(MemoryError(), plan) or ("", "")
    assert code == "out_of_memory"
    assert f"micro_batch_size {used}" in message
    assert f'"micro_batch_size": {next_size}' in message


def test_at_a_micro_batch_of_one_the_message_says_what_else_to_do() -> None:
    message = out_of_memory_message({"batch_size": 7, "micro_batch_size": 1, "crop": 480})
    assert "already 1" in message and "smaller crop" in message
