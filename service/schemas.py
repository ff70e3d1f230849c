"""The public shape of every API response, as pydantic models (docs/api.md).

These models are the only serialisers: routes declare them as `response_model`, and rows
become them through the `from_row` constructors here, never through hand-built dicts. They
are what /openapi.json publishes, and what the Python client's types are checked against.

Sub-objects read from JSON columns (plans, progress, metrics) ignore keys they do not know,
so a row written by a newer version never breaks an older reader.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import Field

from bitcore.artifacts import INPUT_RESIZE
from bitcore.train.callbacks import Progress
from bitcore.train.history import MAX_POINTS
from service import datasets
from service.job_states import JobStatus
from service.plan_schemas import Overrides, Plan
from service.schema_base import Schema, Stored, Timestamp
from service.tables import Dataset, Job, Model

Item = TypeVar("Item")


# -- errors -------------------------------------------------------------------------------


class ErrorInfo(Schema):
    code: str = Field(description="machine-readable, snake_case (docs/api.md lists them)")
    message: str = Field(description="what went wrong and what to do about it")
    details: dict[str, Any] = Field(description="facts about this error, e.g. the limit")


class ErrorBody(Schema):
    """Every error answer: 4xx and 5xx alike."""

    error: ErrorInfo


# -- health -------------------------------------------------------------------------------


class Health(Schema):
    status: Literal["ok"]


class Ready(Schema):
    status: Literal["ready"]


# -- base models --------------------------------------------------------------------------


class BaseModelPublic(Schema):
    """A model a job can start from: a published BiT checkpoint, or a small variant trained
    from scratch."""

    name: str
    architecture: str
    parameters: int
    upstream: str | None = Field(description="data the checkpoint was pre-trained on")
    published: bool
    requires_checkpoint: bool
    checkpoint_present: bool | None = Field(description="null when no checkpoint is needed")
    download_bytes: int | None
    url: str | None
    description: str


# -- datasets -----------------------------------------------------------------------------


class ClassCount(Schema):
    name: str
    count: int


class ImageSize(Schema):
    median_height: int
    median_width: int


class RejectedFile(Schema):
    path: str = Field(description="the member's path inside the uploaded archive")
    reason: str


DatasetStatus = Literal["processing", "ready", "failed"]
IngestPhase = Literal["queued", "extracting", "indexing", "storing", "done"]


class IngestProgress(Schema):
    """Where a dataset's ingestion is: `done` of `total` archive members (extracting) or
    images (indexing); both null while queued or storing."""

    phase: IngestPhase
    done: int | None = None
    total: int | None = None


class DatasetPublic(Schema):
    id: str
    name: str
    status: DatasetStatus = Field(
        description="processing (a worker is ingesting the upload), then ready or failed"
    )
    progress: IngestProgress | None = Field(description="while processing; null after")
    error: ErrorInfo | None = Field(description="why ingestion failed (status failed)")
    num_images: int = Field(description="0 until ready")
    num_classes: int = Field(description="0 until ready")
    classes: list[ClassCount]
    image_size: ImageSize | None = Field(description="null until ready")
    rejected: list[RejectedFile] = Field(
        description="the first members skipped, with why (at most 100, in path order; "
        "all of them: GET /v1/datasets/{id}/rejected)"
    )
    rejected_count: int = Field(description="members skipped in all")
    rejected_reasons: dict[str, int] = Field(description="members skipped per reason")
    bytes: int = Field(description="size of the uploaded archive")
    created_at: Timestamp
    finished_at: Timestamp | None = Field(description="when ingestion ended (null: processing)")

    @property
    def finished(self) -> bool:
        return self.status != "processing"

    @classmethod
    def from_row(cls, row: Dataset) -> DatasetPublic:
        counts = datasets.rejected_counts(row)
        status: DatasetStatus = row.status  # type: ignore[assignment]
        error = None
        if row.error_code:
            error = ErrorInfo(
                code=row.error_code,
                message=row.error_message or "",
                details=dict(row.error_details or {}),
            )
        return cls(
            id=row.id,
            name=row.name,
            status=status,
            progress=IngestProgress(**(row.progress or {"phase": "queued"}))
            if status == "processing"
            else None,
            error=error,
            num_images=row.num_images,
            num_classes=row.num_classes,
            classes=[ClassCount(**c) for c in row.classes],
            image_size=ImageSize(**row.image_size) if row.image_size else None,
            rejected=[RejectedFile(**r) for r in row.rejected[: datasets.REJECTED_INLINE]],
            rejected_count=sum(counts.values()),
            rejected_reasons=counts,
            bytes=row.bytes,
            created_at=row.created_at,
            finished_at=row.finished_at or (row.created_at if status == "ready" else None),
        )


# -- metrics ------------------------------------------------------------------------------


class ClassMetrics(Stored):
    label: str
    precision: float
    recall: float
    f1: float
    support: int


class PrecisionCheck(Stored):
    """The int8 guard's outcome (a job with serving_precision "int8"): top-1 agreement of the
    int8 model with float32 on the validation split, and which one is served."""

    requested: Literal["int8"]
    served: Literal["fp32", "int8"]
    agreement: float | None = Field(description="share of validation images, null: none")
    agreeing: int
    validation_images: int
    threshold: float = Field(description="the least agreement for int8 to be served")
    calibration_images: int = Field(description="training images the int8 ranges came from")
    check_max_diff: float | None = Field(
        description="largest probability difference from float32 on the load check's inputs"
    )
    int8_sha256: str | None
    reason: str


class Metrics(Stored):
    """Validation metrics of a fine-tuned model (null accuracy: no validation images)."""

    accuracy: float | None = None
    macro_f1: float | None = None
    num_examples: int | None = None
    loss: float | None = Field(None, description="mean cross-entropy on the validation split")
    per_class: list[ClassMetrics] = Field(default_factory=list)
    confusion_matrix: list[list[int]] = Field(
        default_factory=list, description="counts[true][predicted], in class order"
    )
    precision: PrecisionCheck | None = Field(
        None, description="the int8 guard's outcome; null: float32 was asked for"
    )


# -- jobs ---------------------------------------------------------------------------------


class DeployOutcome(Stored):
    """What a job's `deploy_to` did when the job succeeded (worker.deploy)."""

    deployment: str
    deployed: bool = Field(description="the deployment points at this job's model now")
    action: Literal["created", "updated", "kept", "failed"]
    version: int | None = Field(description="the deployment's version after it")
    accuracy: float | None = Field(
        description="deploy_if_better: the new model's accuracy on the job's validation split"
    )
    incumbent_model_id: str | None
    incumbent_accuracy: float | None = Field(
        description="deploy_if_better: the former target's accuracy on the same images"
    )
    reason: str


class JobErrorInfo(Schema):
    code: str
    message: str


class TrainingPoint(Stored):
    step: int = Field(description="optimizer steps completed")
    loss: float | None = Field(description="training loss of that step (null: diverged)")
    lr: float | None = Field(description="the learning rate that step used")
    images_per_second: float | None


class ValidationPoint(Stored):
    step: int = Field(description="scored after this many steps (the last: the final result)")
    accuracy: float | None
    loss: float | None = Field(description="mean cross-entropy on the validation split")


class ScheduleMarks(Schema):
    warmup_steps: int = Field(description="the learning rate rises linearly until this step")
    decay_steps: list[int] = Field(description="the learning rate is divided by 10 after each")
    total_steps: int


class JobMetricsPublic(Schema):
    """A job's training curves (GET /v1/jobs/{id}/metrics): every `stride`-th step's loss,
    learning rate and speed (at most `max_points`, plus the latest step), and the validation
    accuracy and loss at the evaluation points."""

    job_id: str
    status: JobStatus
    schedule: ScheduleMarks
    stride: int = Field(description="training points are kept every `stride` steps")
    max_points: int
    training: list[TrainingPoint]
    validation: list[ValidationPoint]

    @classmethod
    def from_row(cls, job: Job, history: dict[str, Any]) -> JobMetricsPublic:
        plan = job.plan
        return cls(
            job_id=job.id,
            status=job.status,
            schedule=ScheduleMarks(
                warmup_steps=int(plan.get("warmup_steps", 0)),
                decay_steps=[int(s) for s in plan.get("decay_steps", [])],
                total_steps=int(plan.get("total_steps", 0)),
            ),
            stride=int(history.get("stride", 1)),
            max_points=int(history.get("max_points", MAX_POINTS)),
            training=[TrainingPoint.model_validate(p) for p in history.get("training", [])],
            validation=[ValidationPoint.model_validate(p) for p in history.get("validation", [])],
        )


class JobPublic(Schema):
    """A fine-tuning job: its plan, where it is, and how it ended."""

    id: str
    name: str | None
    status: JobStatus
    dataset_id: str | None = Field(description="null once the dataset is deleted")
    base_model: str
    validation_fraction: float
    seed: int
    serving_precision: Literal["fp32", "int8"] = Field(
        description="asked for: int8 is served only if the model's int8 guard passed"
    )
    overrides: Overrides
    plan: Plan
    progress: Progress
    attempts: int = Field(description="times a worker started it")
    error: JobErrorInfo | None
    model_id: str | None
    metrics: Metrics | None
    deploy_to: str | None = Field(description="a deployment to update when it succeeds")
    deploy_if_better: bool
    deployment: DeployOutcome | None = Field(description="what deploy_to did (once it ended)")
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None

    @property
    def finished(self) -> bool:
        return self.status.finished

    @classmethod
    def from_row(cls, job: Job) -> JobPublic:
        progress = Progress(step=0, total_steps=int(job.plan.get("total_steps", 0)))
        if job.progress:
            known = {k: v for k, v in job.progress.items() if k in Progress.__dataclass_fields__}
            progress = Progress(**{**progress.__dict__, **known})
        error = None
        if job.error_code:
            error = JobErrorInfo(code=job.error_code, message=job.error_message or "")
        return cls(
            id=job.id,
            name=job.name,
            status=job.status,
            dataset_id=job.dataset_id,
            base_model=job.base_model,
            validation_fraction=job.validation_fraction,
            seed=job.seed,
            serving_precision="int8" if job.serving_precision == "int8" else "fp32",
            overrides=Overrides(**(job.overrides or {})),
            plan=Plan.model_validate(job.plan),
            progress=progress,
            attempts=job.attempts,
            error=error,
            model_id=job.model_id,
            metrics=Metrics.model_validate(job.metrics) if job.metrics is not None else None,
            deploy_to=job.deploy_to,
            deploy_if_better=bool(job.deploy_if_better),
            deployment=DeployOutcome.model_validate(job.deployment) if job.deployment else None,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


# -- models -------------------------------------------------------------------------------


class InputSpec(Schema):
    """How to preprocess an image for the model: resize to crop x crop, RGB in [0, 1], then
    (x - mean) / std per channel."""

    crop: int
    mean: list[float]
    std: list[float]
    # Models made before the field was recorded were preprocessed the same way.
    resize: str = Field(default=INPUT_RESIZE, description="how the image becomes crop x crop")


class ModelPublic(Schema):
    """A fine-tuned model, ready to predict."""

    id: str
    name: str | None
    job_id: str | None
    base_model: str
    classes: list[str] = Field(description="labels, in the order of the model's outputs")
    plan: Plan
    metrics: Metrics
    input: InputSpec
    created_at: Timestamp

    @classmethod
    def from_row(cls, row: Model) -> ModelPublic:
        return cls(
            id=row.id,
            name=row.name,
            job_id=row.job_id,
            base_model=row.base_model,
            classes=list(row.classes),
            plan=Plan.model_validate(row.plan),
            metrics=Metrics.model_validate(row.metrics or {}),
            input=InputSpec(**row.input),
            created_at=row.created_at,
        )


class Label(Schema):
    label: str
    score: float = Field(description="softmax probability")


class ImagePrediction(Schema):
    top_k: list[Label] = Field(description="most probable first")


class PredictResponse(Schema):
    model_id: str
    predictions: list[ImagePrediction] = Field(description="one per image, in request order")


# -- pages --------------------------------------------------------------------------------


class Page(Schema, Generic[Item]):
    """One page of a list, newest first."""

    items: list[Item]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null: last")
