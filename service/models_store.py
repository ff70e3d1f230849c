"""Fine-tuned models: rows in the `models` table plus a bitcore artifact directory on disk.

Plain functions over a SQLAlchemy session and the Storage: the router maps HTTP to them, and
tests and benchmarks call them directly (a job's model row is written by
service.job_runs.finish_succeeded, in the transaction that marks the job succeeded). Every query
filters by tenant (None until API keys are configured), so another tenant's id is NotFound,
exactly like an unknown one.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bitcore.artifacts import (
    INPUT_MEAN,
    INPUT_STD,
    METADATA_FILE,
    WEIGHTS_FILE,
    ArtifactMetadata,
    load_metadata,
)
from bitcore.quantize import INT8_FILE
from service.domain_errors import Conflict, Gone, NotFound
from service.ids import new_id
from service.object_store import ObjectCorrupt, ObjectMissing, ObjectStoreError
from service.storage import Storage, storage_unavailable
from service.tables import (
    BatchPrediction,
    Deployment,
    DeploymentTarget,
    Evaluation,
    Job,
    Model,
    tenant_is,
)

log = logging.getLogger(__name__)

ARTIFACT_FILES = (WEIGHTS_FILE, METADATA_FILE)
ZIP_CHUNK_BYTES = 1 << 20


def new_model_id() -> str:
    return new_id("mdl")


@dataclass(frozen=True)
class TrainedModel:
    """What a finished job hands over: its artifact (written at `storage_key`) and what the
    model row says about it."""

    model_id: str
    storage_key: str
    classes: list[str]
    input_spec: dict[str, Any]
    metrics: dict[str, Any]
    bytes: int  # of the artifact's files: counts against the tenant's max_stored_bytes

    @classmethod
    def from_artifact(
        cls, storage: Storage, model_id: str, metrics: dict[str, Any]
    ) -> TrainedModel:
        """Read classes and input size from the artifact's metadata.json, so the row always
        describes the weights that are actually served, and measure its files."""
        directory = storage.model_dir(model_id)
        meta = load_metadata(directory)
        return cls(
            model_id,
            storage.key(directory),
            list(meta.classes),
            input_spec(meta),
            metrics,
            artifact_bytes(directory),
        )


def artifact_bytes(directory: Path) -> int:
    """Total size of the files under an artifact directory."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def model_row(job: Job, trained: TrainedModel, created_at: datetime) -> Model:
    """The row describing the model job `job` produced. service.job_runs.finish_succeeded
    adds it in the transaction that marks the job succeeded: the one place a model row is
    written."""
    return Model(
        id=trained.model_id,
        tenant_id=job.tenant_id,
        job_id=job.id,
        base_model=job.base_model,
        name=job.name,
        classes=list(trained.classes),
        plan=job.plan,
        metrics=trained.metrics,
        input=trained.input_spec,
        storage_key=trained.storage_key,
        bytes=trained.bytes,
        created_at=created_at,
    )


def input_spec(meta: ArtifactMetadata) -> dict[str, Any]:
    """How a client preprocesses images for the model (docs/api.md, "Models": input)."""
    return {"crop": meta.crop, "mean": list(INPUT_MEAN), "std": list(INPUT_STD)}


def get_model(session: Session, tenant_id: str | None, model_id: str) -> Model:
    """The tenant's model; NotFound for unknown ids and other tenants' models alike."""
    row = session.get(Model, model_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound("model", model_id)
    return row


def list_models(tenant_id: str | None) -> sa.Select[Model]:
    """The tenant's models, for service.pagination.paginate (newest first)."""
    return sa.select(Model).where(tenant_is(Model.tenant_id, tenant_id))


def delete_model(session: Session, storage: Storage, tenant_id: str | None, model_id: str) -> None:
    """Delete the row (committed first, so nobody finds it any more), then the artifact files.

    Raises NotFound when the tenant has no such model.
    """
    row = get_model(session, tenant_id, model_id)
    in_use = deployments_using(session, model_id)
    if in_use:
        raise model_in_use(model_id, in_use)
    scored = session.scalars(sa.select(Evaluation.id).where(Evaluation.model_id == model_id)).all()
    batches = session.scalars(
        sa.select(BatchPrediction.id).where(BatchPrediction.model_id == model_id)
    ).all()
    # Its evaluations' and batch predictions' rows go with it (ON DELETE CASCADE); a worker
    # running one of them finds its row gone and stops at its next shard.
    session.delete(row)
    try:
        session.commit()
    except IntegrityError:  # a deployment took it up since the check (its key RESTRICTs)
        session.rollback()
        raise model_in_use(model_id, deployments_using(session, model_id)) from None
    storage.discard("models", model_id)
    for evaluation_id in scored:  # and their thumbnails
        storage.discard("evaluations", evaluation_id)
    for batch_id in batches:  # and their outputs
        storage.discard("batch_predictions", batch_id)


def deployments_using(session: Session, model_id: str) -> list[str]:
    """The names of the deployments that use the model (as a target or the shadow)."""
    return list(
        session.scalars(
            sa.select(Deployment.name)
            .join(DeploymentTarget, DeploymentTarget.deployment_id == Deployment.id)
            .where(DeploymentTarget.model_id == model_id)
            .order_by(Deployment.name)
            .distinct()
        )
    )


def model_in_use(model_id: str, names: Sequence[str]) -> Conflict:
    return Conflict(
        "model_in_use",
        f"model {model_id} is used by deployment {', '.join(names)}: point "
        f"{'it' if len(names) == 1 else 'them'} at another model (PATCH /v1/deployments/NAME) "
        "or delete it first",
        {"deployments": list(names)},
    )


def artifact_files(storage: Storage, model_id: str) -> list[Path]:
    """The files of the model's artifact (fetched from the object store on a cache miss);
    Gone if any is missing (the row outlived them)."""
    try:
        directory = storage.ensure_local("models", model_id)
    except ObjectMissing:
        directory = storage.model_dir(model_id)
    except ObjectCorrupt as exc:
        log.error("model %s: its artifact in the object store is damaged: %s", model_id, exc)
        raise Gone(
            "artifact_missing",
            f"the artifact of model {model_id} is damaged in the server's object store; "
            "the model cannot be downloaded",
        ) from None
    except ObjectStoreError as exc:
        log.warning("model %s: the object store failed: %s", model_id, exc)
        raise storage_unavailable("try again shortly") from None
    files = [directory / name for name in ARTIFACT_FILES]
    for path in files:
        if not path.is_file():
            raise Gone(
                "artifact_missing",
                f"{path.name} of model {model_id} is missing; the model cannot be downloaded",
            )
    # The int8 graph the model is served with (bitcore.quantize), when its guard passed: the
    # download is the model as served, and bitcore's Predictor.load serves it the same way.
    int8 = directory / INT8_FILE
    return [*files, int8] if int8.is_file() else files


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
