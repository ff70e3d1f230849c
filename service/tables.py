"""The database tables (SQLAlchemy 2 typed ORM). Schema changes go through Alembic migrations.

Every row carries `tenant_id` (the tenant of the API key that made it; "default" when auth is
off) and every query filters by it, so one tenant never sees another's objects.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, InstrumentedAttribute, Mapped, mapped_column

from service.ids import utcnow
from service.job_states import JobStatus


def tenant_is(
    column: InstrumentedAttribute[str | None], tenant_id: str | None
) -> sa.ColumnElement[bool]:
    """`column` belongs to `tenant_id`; None (no API keys configured) matches NULL, which `==`
    would not."""
    return column.is_(None) if tenant_id is None else column == tenant_id


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    PostgreSQL stores `timestamptz`; SQLite has no time zones, so naive UTC is stored and
    UTC is attached again on the way out (otherwise comparisons mix naive and aware values).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobStatusType(sa.TypeDecorator[JobStatus]):
    """A job's status: VARCHAR(16) in the database, a JobStatus in Python. Writing a string
    that is no JobStatus fails before it reaches the database."""

    impl = sa.String(16)
    cache_ok = True

    def process_bind_param(self, value: JobStatus | str | None, dialect: Dialect) -> str | None:
        return None if value is None else JobStatus(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> JobStatus | None:
        return None if value is None else JobStatus(value)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime,
        dict[str, Any]: sa.JSON,
        list[Any]: sa.JSON,
    }


class Dataset(Base):
    """An uploaded dataset. `status` is processing (a worker ingests it: service.ingest_runs),
    then ready or failed; the counts, classes and image size are known once ready."""

    __tablename__ = "datasets"
    __table_args__ = (
        sa.Index("ix_datasets_tenant_created", "tenant_id", "created_at"),
        sa.Index("ix_datasets_status_heartbeat", "status", "heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(sa.String(64))
    name: Mapped[str] = mapped_column(sa.String(200))
    status: Mapped[str] = mapped_column(sa.String(16), default="ready")
    num_images: Mapped[int]
    num_classes: Mapped[int]
    classes: Mapped[list[Any]]  # [{name, count}]
    image_size: Mapped[dict[str, Any]]  # {median_height, median_width}
    rejected: Mapped[list[Any]]  # [{path, reason}]: the first REJECTED_INLINE (service.datasets)
    # {reason: count} of every rejected member; NULL on rows made before it (count `rejected`).
    rejected_counts: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    bytes: Mapped[int] = mapped_column(sa.BigInteger)  # size of the uploaded archive
    storage_key: Mapped[str] = mapped_column(sa.String(200))  # relative to the artifact root
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Ingestion (migration 0004; NULL/0 on datasets made before, which are all ready).
    ingest: Mapped[dict[str, Any] | None] = mapped_column(default=None)  # {kind, limits}
    progress: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    error_code: Mapped[str | None] = mapped_column(sa.String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(sa.Text, default=None)
    error_details: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    worker_id: Mapped[str | None] = mapped_column(sa.String(200), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    sent_at: Mapped[datetime | None] = mapped_column(default=None)  # the ingest message
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        sa.Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),
        sa.Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        # COALESCE: NULL tenants (no API keys) must still collide on the same key.
        sa.Index(
            "uq_jobs_tenant_idempotency",
            sa.func.coalesce(sa.text("tenant_id"), ""),
            "idempotency_key",
            unique=True,
        ),
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(sa.String(64))
    # SET NULL: a finished job outlives its dataset (deleting a dataset is refused only while
    # an active job uses it).
    dataset_id: Mapped[str | None] = mapped_column(
        sa.ForeignKey("datasets.id", ondelete="SET NULL"), index=True
    )
    base_model: Mapped[str] = mapped_column(sa.String(64))
    name: Mapped[str | None] = mapped_column(sa.String(200))
    status: Mapped[JobStatus] = mapped_column(JobStatusType(), default=JobStatus.QUEUED)
    plan: Mapped[dict[str, Any]]
    validation_fraction: Mapped[float] = mapped_column(sa.Float, default=0.1)
    seed: Mapped[int] = mapped_column(default=0)
    # "fp32" or "int8" (bitcore.quantize): int8 is served only if the guard passes.
    serving_precision: Mapped[str] = mapped_column(
        sa.String(8), default="fp32", server_default="fp32"
    )
    # A deployment to point at the model when the job succeeds (worker.deploy), and the outcome.
    deploy_to: Mapped[str | None] = mapped_column(sa.String(63))
    deploy_if_better: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    deployment: Mapped[dict[str, Any] | None]
    overrides: Mapped[dict[str, Any]] = mapped_column(default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(200))
    request_hash: Mapped[str | None] = mapped_column(sa.String(64))
    progress: Mapped[dict[str, Any] | None]
    attempts: Mapped[int] = mapped_column(default=0)
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    model_id: Mapped[str | None] = mapped_column(sa.String(40))
    metrics: Mapped[dict[str, Any] | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    worker_id: Mapped[str | None] = mapped_column(sa.String(200))
    heartbeat_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class JobHistory(Base):
    """A job's training curves (bitcore.train.history: at most ~500 training points and the
    validation points), apart from the jobs row so that listing jobs never reads them."""

    __tablename__ = "job_histories"

    job_id: Mapped[str] = mapped_column(
        sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    history: Mapped[dict[str, Any]]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (sa.Index("ix_models_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(sa.String(64))
    job_id: Mapped[str | None] = mapped_column(sa.String(40), index=True)
    base_model: Mapped[str] = mapped_column(sa.String(64))
    name: Mapped[str | None] = mapped_column(sa.String(200))
    classes: Mapped[list[Any]]  # [str], in label order
    plan: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any] | None]
    input: Mapped[dict[str, Any]]  # {crop, mean, std}
    storage_key: Mapped[str] = mapped_column(sa.String(200))
    bytes: Mapped[int] = mapped_column(sa.BigInteger, default=0)  # of the artifact's files
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Evaluation(Base):
    """A model scored on a labelled dataset (service.evaluations; run by worker.evaluate), or
    its fine-tune's own validation result (source "validation", recorded with the model)."""

    __tablename__ = "evaluations"
    __table_args__ = (
        sa.Index("ix_evaluations_model_created", "model_id", "created_at"),
        sa.Index("ix_evaluations_status_heartbeat", "status", "heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(sa.String(64))
    model_id: Mapped[str] = mapped_column(sa.ForeignKey("models.id", ondelete="CASCADE"))
    dataset_id: Mapped[str | None] = mapped_column(
        sa.ForeignKey("datasets.id", ondelete="SET NULL"), index=True
    )
    source: Mapped[str] = mapped_column(sa.String(16))  # "validation" or "dataset"
    status: Mapped[str] = mapped_column(sa.String(16))  # queued, running, succeeded, failed
    progress: Mapped[dict[str, Any] | None]
    result: Mapped[dict[str, Any] | None]
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    worker_id: Mapped[str | None] = mapped_column(sa.String(200))
    heartbeat_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0)
    sent_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class BatchPrediction(Base):
    """A model's top-k predictions for every file of a dataset, written as one CSV or JSONL
    file (service.batch_predictions; run by worker.batch_predict, shard by shard)."""

    __tablename__ = "batch_predictions"
    __table_args__ = (
        sa.Index("ix_batch_predictions_model_created", "model_id", "created_at"),
        sa.Index("ix_batch_predictions_status_heartbeat", "status", "heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(sa.String(64))
    model_id: Mapped[str] = mapped_column(sa.ForeignKey("models.id", ondelete="CASCADE"))
    dataset_id: Mapped[str | None] = mapped_column(
        sa.ForeignKey("datasets.id", ondelete="SET NULL"), index=True
    )
    top_k: Mapped[int]
    format: Mapped[str] = mapped_column(sa.String(8))  # "csv" or "jsonl"
    # queued, running, cancelling, succeeded, failed, cancelled
    status: Mapped[str] = mapped_column(sa.String(16))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    shards_total: Mapped[int | None]  # known once a worker has read the dataset's index
    shards_done: Mapped[int] = mapped_column(default=0)
    images_total: Mapped[int | None]
    images_done: Mapped[int] = mapped_column(default=0)
    result: Mapped[dict[str, Any] | None]  # {rows, bytes, sha256} of the output file
    error_code: Mapped[str | None] = mapped_column(sa.String(64))
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    worker_id: Mapped[str | None] = mapped_column(sa.String(200))
    heartbeat_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0)
    sent_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Tenant(Base):
    """A tenant's quota overrides (NULL: the Settings default). A tenant exists as soon as a
    key names it; this row is written when an admin sets a quota, or (all NULL) on demand by
    service.quotas.lock_tenant, whose row lock makes the quota checks race-safe."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    max_active_jobs: Mapped[int | None]
    max_stored_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    predict_rate_per_second: Mapped[float | None] = mapped_column(sa.Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ApiKey(Base):
    """An API key: only the keyed hash of its secret is stored (service.api_keys)."""

    __tablename__ = "api_keys"
    __table_args__ = (sa.Index("ix_api_keys_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(64))
    name: Mapped[str | None] = mapped_column(sa.String(200))
    scopes: Mapped[list[Any]]  # [str]: admin, train, predict
    global_admin: Mapped[bool] = mapped_column(default=False)
    secret_hash: Mapped[str] = mapped_column(sa.String(64))
    created_by: Mapped[str | None] = mapped_column(sa.String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class AuditEvent(Base):
    """One mutating API call: who (key, tenant), what (method, route, object), when, result."""

    __tablename__ = "audit_events"
    __table_args__ = (sa.Index("ix_audit_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(sa.String(64))
    key_id: Mapped[str | None] = mapped_column(sa.String(40))
    method: Mapped[str] = mapped_column(sa.String(8))
    route: Mapped[str] = mapped_column(sa.String(200))
    object_id: Mapped[str | None] = mapped_column(sa.String(64))
    status: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Deployment(Base):
    """A stable name (per tenant) for the model(s) that answer its predictions: one target, a
    split by weight, and maybe a shadow (service.deployments). `version` counts its changes."""

    __tablename__ = "deployments"
    __table_args__ = (
        # COALESCE: NULL tenants (no API keys) must still collide on the same name.
        sa.Index(
            "uq_deployments_tenant_name",
            sa.func.coalesce(sa.text("tenant_id"), ""),
            "name",
            unique=True,
        ),
    )

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(sa.String(64))
    name: Mapped[str] = mapped_column(sa.String(63))
    version: Mapped[int] = mapped_column(default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeploymentTarget(Base):
    """A model a deployment uses now: a target (weight > 0) or its shadow (weight 0). The
    foreign key RESTRICTs deleting a model in use (service.models_store names the deployment
    first; the key is the last word if a race gets past that check)."""

    __tablename__ = "deployment_targets"

    deployment_id: Mapped[str] = mapped_column(
        sa.ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[str] = mapped_column(sa.String(8), primary_key=True)  # target | shadow
    model_id: Mapped[str] = mapped_column(
        sa.ForeignKey("models.id", ondelete="RESTRICT"), primary_key=True, index=True
    )
    weight: Mapped[int] = mapped_column(default=0)
    position: Mapped[int] = mapped_column(default=0)  # the order the caller gave


class DeploymentChange(Base):
    """One change of a deployment, as it happened: who, when, from what, to what."""

    __tablename__ = "deployment_changes"
    __table_args__ = (sa.Index("ix_deployment_changes_version", "deployment_id", "version"),)

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    deployment_id: Mapped[str] = mapped_column(sa.ForeignKey("deployments.id", ondelete="CASCADE"))
    version: Mapped[int]
    action: Mapped[str] = mapped_column(sa.String(16))  # created | updated | rolled_back
    actor: Mapped[str | None] = mapped_column(sa.String(40))  # the API key's id
    before: Mapped[dict[str, Any] | None]  # {targets: [{model_id, weight}], shadow_model_id}
    after: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeploymentStat(Base):
    """What a model answered through a deployment, summed over every gateway process (each
    adds its counts every few seconds: service.deployment_stats)."""

    __tablename__ = "deployment_stats"

    deployment_id: Mapped[str] = mapped_column(
        sa.ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True
    )
    model_id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    role: Mapped[str] = mapped_column(sa.String(8), primary_key=True)
    requests: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    errors: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    images: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    latency_ms_sum: Mapped[float] = mapped_column(sa.Float, default=0.0)
    latency_buckets: Mapped[list[Any]]  # counts per service.deployment_stats.LATENCY_BOUNDS_MS
    top1: Mapped[dict[str, Any]]  # {label: images whose first label it was}
    compared: Mapped[int] = mapped_column(sa.BigInteger, default=0)  # shadow: images compared
    agreed: Mapped[int] = mapped_column(sa.BigInteger, default=0)  # shadow: same first label
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
