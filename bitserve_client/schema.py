"""The JSON shapes the API returns (docs/api.md), as TypedDicts: plain dicts, typed for
editors and mypy.

They mirror the server's response schemas in /openapi.json, field for field;
tests/unit/test_client_schema.py checks that against the server's own OpenAPI document, so
the two cannot drift apart. The client does not validate or copy answers, so fields a newer
server adds are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypedDict

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
Phase = Literal["downloading", "preparing", "training", "evaluating", "done"]
Scope = Literal["admin", "predict", "train"]


class ClassCount(TypedDict):
    name: str
    count: int


class Rejected(TypedDict):
    path: str
    reason: str


class ImageSize(TypedDict):
    median_height: int
    median_width: int


DatasetStatus = Literal["processing", "ready", "failed"]
IngestPhase = Literal["queued", "extracting", "indexing", "storing", "done"]


class IngestProgress(TypedDict):
    phase: IngestPhase
    done: int | None  # archive members (extracting) or images (indexing)
    total: int | None


class IngestProgressEvent(IngestProgress):
    """The data of a dataset's `progress` event: its ingestion progress and its id."""

    id: str


class ErrorInfo(TypedDict):
    code: str
    message: str
    details: dict[str, Any]


class Dataset(TypedDict):
    id: str
    name: str
    status: DatasetStatus  # processing (being ingested), then ready or failed
    progress: IngestProgress | None  # while processing
    error: ErrorInfo | None  # why ingestion failed
    num_images: int  # 0 until ready
    num_classes: int
    classes: list[ClassCount]
    image_size: ImageSize | None  # null until ready
    rejected: list[Rejected]  # the first 100; all: BitserveClient.rejected_files
    rejected_count: int
    rejected_reasons: dict[str, int]
    bytes: int
    created_at: str
    finished_at: str | None


class PlanSource(TypedDict):
    rule: Literal["bit-hyperrule"]
    resolution: Literal["code", "paper"]
    num_examples: int | None
    image_size: list[int] | None
    overridden: list[str]
    from_scratch: bool


class Plan(TypedDict):
    precrop: int
    crop: int
    batch_size: int
    micro_batch_size: int | None
    base_lr: float
    momentum: float
    weight_decay: float
    warmup_steps: int
    decay_steps: list[int]
    total_steps: int
    mixup_alpha: float
    zero_head: bool
    source: PlanSource


class Overrides(TypedDict, total=False):
    steps: int | None
    warmup_steps: int | None
    batch_size: int | None
    micro_batch_size: int | None
    base_lr: float | None
    crop: int | None
    precrop: int | None
    mixup_alpha: float | None


class WorkEstimate(TypedDict):
    training_examples: int
    images_processed: int
    epochs: float
    seconds: float | None
    basis: str


class JobCost(TypedDict):
    memory_bytes: int
    micro_batch_size: int
    cache_bytes: int
    images_processed: int


class PlanEstimate(TypedDict):
    dataset_id: str
    base_model: str
    validation_fraction: float
    plan: Plan
    estimate: WorkEstimate
    cost: JobCost


class BaseModel(TypedDict):
    name: str
    architecture: str
    parameters: int
    upstream: str | None
    published: bool
    requires_checkpoint: bool
    checkpoint_present: bool | None
    download_bytes: int | None
    url: str | None
    description: str


class Progress(TypedDict):
    step: int
    total_steps: int
    loss: float | None
    lr: float | None
    images_per_second: float | None
    eta_seconds: float | None
    phase: Phase | None
    downloaded_bytes: int | None
    total_bytes: int | None


class ProgressEvent(Progress):
    """The data of a `progress` event: the job's progress and its id."""

    id: str


class JobErrorBody(TypedDict):
    code: str
    message: str


class ClassMetrics(TypedDict):
    label: str
    precision: float
    recall: float
    f1: float
    support: int


class PrecisionCheck(TypedDict):
    requested: Literal["int8"]
    served: Literal["fp32", "int8"]
    agreement: float | None
    agreeing: int
    validation_images: int
    threshold: float
    calibration_images: int
    check_max_diff: float | None
    int8_sha256: str | None
    reason: str


class Metrics(TypedDict):
    accuracy: float | None
    macro_f1: float | None
    num_examples: int | None
    loss: float | None
    per_class: list[ClassMetrics]
    confusion_matrix: list[list[int]]
    precision: PrecisionCheck | None


class TrainingPoint(TypedDict):
    step: int
    loss: float | None
    lr: float | None
    images_per_second: float | None


class ValidationPoint(TypedDict):
    step: int
    accuracy: float | None
    loss: float | None


class ScheduleMarks(TypedDict):
    warmup_steps: int
    decay_steps: list[int]
    total_steps: int


class JobMetrics(TypedDict):
    """GET /v1/jobs/{id}/metrics: the job's training curves."""

    job_id: str
    status: JobStatus
    schedule: ScheduleMarks
    stride: int
    max_points: int
    training: list[TrainingPoint]
    validation: list[ValidationPoint]


class DeployOutcome(TypedDict):
    """What a job's deploy_to did when it succeeded."""

    deployment: str
    deployed: bool
    action: Literal["created", "updated", "kept", "failed"]
    version: int | None
    accuracy: float | None
    incumbent_model_id: str | None
    incumbent_accuracy: float | None
    reason: str


class Job(TypedDict):
    id: str
    name: str | None
    status: JobStatus
    dataset_id: str | None
    base_model: str
    validation_fraction: float
    seed: int
    serving_precision: Literal["fp32", "int8"]
    overrides: Overrides
    plan: Plan
    progress: Progress
    attempts: int
    error: JobErrorBody | None
    model_id: str | None
    metrics: Metrics | None
    deploy_to: str | None
    deploy_if_better: bool
    deployment: DeployOutcome | None
    created_at: str
    started_at: str | None
    finished_at: str | None


class InputSpec(TypedDict):
    crop: int
    mean: list[float]
    std: list[float]
    resize: str  # e.g. "bilinear, whole image squashed to crop x crop (...)"


class Model(TypedDict):
    id: str
    name: str | None
    job_id: str | None
    base_model: str
    classes: list[str]
    plan: Plan
    metrics: Metrics
    input: InputSpec
    created_at: str


class Label(TypedDict):
    label: str
    score: float


class ImagePrediction(TypedDict):
    top_k: list[Label]


class Predictions(TypedDict):
    model_id: str
    predictions: list[ImagePrediction]


class TargetWeight(TypedDict):
    model_id: str
    weight: int  # a share of the requests


class Deployment(TypedDict):
    """A stable name for served models (POST/GET/PATCH /v1/deployments, .../rollback)."""

    name: str
    targets: list[TargetWeight]  # who answers, and each one's share
    shadow_model_id: str | None  # gets a copy of each request; its answers are never returned
    version: int  # 1 when created, +1 per change
    created_at: str
    updated_at: str


class Targets(TypedDict):
    targets: list[TargetWeight]
    shadow_model_id: str | None


class DeploymentChange(TypedDict):
    """One entry of GET /v1/deployments/{name}/history."""

    version: int
    action: Literal["created", "updated", "rolled_back"]
    actor: str | None  # the id of the API key that made the change
    at: str
    before: Targets | None  # None when it was created
    after: Targets


class DeploymentPrediction(Predictions):
    """POST /v1/deployments/{name}/predict: `model_id` is the model that answered."""

    deployment: str
    version: int  # the deployment's version that answered


class LatencyMs(TypedDict):
    mean: float
    p50: float | None  # upper bound of the bucket (None: over 10 s)
    p95: float | None


class Agreement(TypedDict):
    compared: int  # images the shadow answered beside a target
    agreed: int  # of those, how many got the same first label


class ModelFigures(TypedDict):
    model_id: str
    role: Literal["target", "shadow"]
    weight: int | None  # its share now (None: the shadow, or no longer used)
    requests: int
    errors: int
    images: int
    latency_ms: LatencyMs | None
    top1_labels: dict[str, int]  # images per first label, most frequent first
    agreement: Agreement | None


class DeploymentStats(TypedDict):
    """GET /v1/deployments/{name}/stats: per model, over every gateway."""

    deployment: str
    version: int
    models: list[ModelFigures]


class QuotaUsage(TypedDict):
    active_jobs: int
    stored_bytes: int


class TenantQuotas(TypedDict):
    """GET/PUT /v1/tenants/{tenant}/quotas: the quotas in force and the tenant's usage."""

    tenant: str
    max_active_jobs: int
    max_stored_bytes: int
    predict_rate_per_second: float
    overridden: list[str]
    usage: QuotaUsage


class ApiKey(TypedDict):
    """An API key without its secret (GET /v1/keys)."""

    id: str
    tenant: str
    name: str | None
    scopes: list[Scope]
    global_admin: bool
    created_by: str | None
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    last_used_at: str | None


class CreatedKey(ApiKey):
    """POST /v1/keys: the new key, whose secret `key` is shown this once."""

    key: str


class AuditEvent(TypedDict):
    """One mutating API call (GET /v1/audit, admins only)."""

    id: str
    tenant: str | None
    key_id: str | None
    method: str
    route: str
    object_id: str | None
    status: int
    created_at: str


@dataclass(frozen=True)
class JobEvent:
    """One event of a job's stream: `status` (data: the Job), `progress` (data: a
    ProgressEvent) or the final `done` (data: the finished Job); of a dataset's ingestion
    stream alike, with a Dataset and an IngestProgressEvent."""

    event: str
    data: dict[str, Any]
