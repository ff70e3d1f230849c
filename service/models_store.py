"""Fine-tuned models: rows in the `models` table plus a bitcore artifact directory on disk.

Plain functions over a SQLAlchemy session and the Storage: the router maps HTTP to them, and
tests and benchmarks call them directly (a job's model row is written by
service.job_runs.finish_succeeded, in the transaction that marks the job succeeded). Every query
filters by tenant (None until API keys are configured), so another tenant's id is "not found".
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from bitcore.artifacts import (
    INPUT_MEAN,
    INPUT_STD,
    METADATA_FILE,
    WEIGHTS_FILE,
    ArtifactMetadata,
    load_metadata,
)
from service.ids import new_id, rfc3339, utcnow
from service.storage import Storage
from service.tables import Model, tenant_is

ARTIFACT_FILES = (WEIGHTS_FILE, METADATA_FILE)
ZIP_CHUNK_BYTES = 1 << 20


def new_model_id() -> str:
    return new_id("mdl")


def register_model(
    session: Session,
    storage: Storage,
    model_id: str,
    *,
    base_model: str,
    job_id: str | None = None,
    tenant_id: str | None = None,
    name: str | None = None,
    metrics: dict[str, Any] | None = None,
    created_at: datetime | None = None,
) -> Model:
    """Add the row for an artifact already written to `storage.model_dir(model_id)`.

    Classes, plan, input size and (unless given) metrics are read from the artifact's
    metadata.json, so the row always describes the weights that are actually served.
    The caller commits.
    """
    directory = storage.model_dir(model_id)
    meta = load_metadata(directory)
    row = Model(
        id=model_id,
        tenant_id=tenant_id,
        job_id=job_id,
        base_model=base_model,
        name=name,
        classes=list(meta.classes),
        plan=dict(meta.plan),
        metrics=dict(metrics if metrics is not None else meta.metrics),
        input=input_spec(meta),
        storage_key=storage.key(directory),
        created_at=created_at or utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def input_spec(meta: ArtifactMetadata) -> dict[str, Any]:
    """How a client preprocesses images for the model (api.md "Models": input)."""
    return {"crop": meta.crop, "mean": list(INPUT_MEAN), "std": list(INPUT_STD)}


def get_model(session: Session, tenant_id: str | None, model_id: str) -> Model | None:
    """The tenant's model, or None (unknown and not-yours look the same)."""
    row = session.get(Model, model_id)
    if row is None or row.tenant_id != tenant_id:
        return None
    return row


def list_models_query(tenant_id: str | None) -> sa.Select[Model]:
    """The tenant's models, for service.pagination.paginate (newest first)."""
    return sa.select(Model).where(tenant_is(Model.tenant_id, tenant_id))


def delete_model(session: Session, storage: Storage, tenant_id: str | None, model_id: str) -> bool:
    """Delete the row (committed first, so nobody finds it any more), then the artifact files.

    Returns False when the tenant has no such model.
    """
    row = get_model(session, tenant_id, model_id)
    if row is None:
        return False
    session.delete(row)
    session.commit()
    storage.remove(storage.model_dir(model_id))
    return True


def model_to_api(row: Model) -> dict[str, Any]:
    """The API shape of a model (api.md "Models")."""
    metrics = dict(row.metrics or {})
    for key, empty in (("accuracy", None), ("per_class", []), ("confusion_matrix", [])):
        metrics.setdefault(key, empty)
    return {
        "id": row.id,
        "name": row.name,
        "job_id": row.job_id,
        "base_model": row.base_model,
        "classes": list(row.classes),
        "plan": row.plan,
        "metrics": metrics,
        "input": row.input,
        "created_at": rfc3339(row.created_at),
    }


def artifact_files(storage: Storage, model_id: str) -> list[Path]:
    """The files of the model's artifact; FileNotFoundError if any is missing."""
    directory = storage.model_dir(model_id)
    files = [directory / name for name in ARTIFACT_FILES]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path.name} of model {model_id} is missing")
    return files


def iter_artifact_zip(files: list[Path], chunk_size: int = ZIP_CHUNK_BYTES) -> Iterator[bytes]:
    """A .zip of `files` (flat), produced chunk by chunk: nothing is held whole in memory.

    Stored, not deflated: float weights hardly compress, and streaming stays cheap.
    """
    sink = _ChunkSink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as archive:
        for path in files:
            info = zipfile.ZipInfo.from_file(path, arcname=path.name)
            info.compress_type = zipfile.ZIP_STORED
            with path.open("rb") as src, archive.open(info, "w") as dst:
                while block := src.read(chunk_size):
                    dst.write(block)
                    yield from sink.drain()
            yield from sink.drain()
    yield from sink.drain()


class _ChunkSink(io.RawIOBase):
    """A write-only, non-seekable stream: zipfile then writes data descriptors after each
    member instead of seeking back, so the archive can be streamed as it is produced."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._chunks.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def drain(self) -> Iterator[bytes]:
        chunks, self._chunks = self._chunks, []
        if chunks:
            yield b"".join(chunks)
