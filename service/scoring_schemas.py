"""The public shapes of evaluations and batch predictions (a model scored on a labelled dataset;
a model run over a whole dataset), apart from service.schemas to keep each module small."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from service.schema_base import Schema, Stored, Timestamp
from service.schemas import ClassMetrics, JobErrorInfo
from service.tables import BatchPrediction, Evaluation


class ConfusedPair(Stored):
    label: str = Field(description="the true label")
    predicted: str
    count: int


class WorstExample(Stored):
    index: int = Field(description="GET /v1/evaluations/{id}/examples/{index}: its thumbnail")
    path: str = Field(description="the image's path inside the dataset")
    label: str
    predicted: str
    label_score: float = Field(description="the model's probability for the true label")
    predicted_score: float


class EvaluationResult(Stored):
    """What an evaluation measured, over the model's classes in its output order."""

    accuracy: float | None
    loss: float | None = Field(description="mean cross-entropy")
    macro_f1: float | None = Field(
        description="mean F1 over the labels that occur (true or predicted), as scikit-learn"
    )
    num_examples: int
    per_class: list[ClassMetrics]
    confusion_matrix: list[list[int]] = Field(description="counts[true][predicted]")
    top_k_accuracy: dict[str, float] | None = Field(
        None, description='{"1": ..., "3": ..., "5": ...}; null for the validation result'
    )
    most_confused: list[ConfusedPair] = Field(default_factory=list)
    classes: list[str] = Field(default_factory=list, description="the model's classes")
    labels_evaluated: list[str] = Field(default_factory=list)
    skipped: int = Field(0, description="images that could not be decoded")
    worst: list[WorstExample] = Field(
        default_factory=list, description="the lowest-scored images for their true label"
    )


class EvaluationProgress(Stored):
    done: int
    total: int | None


class EvaluationPublic(Schema):
    """A model scored on a labelled dataset, or its fine-tune's own validation result."""

    id: str
    model_id: str
    dataset_id: str | None = Field(description="null: the validation split, or deleted")
    source: Literal["validation", "dataset"]
    status: Literal["queued", "running", "succeeded", "failed"]
    progress: EvaluationProgress | None
    result: EvaluationResult | None
    error: JobErrorInfo | None
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None

    @classmethod
    def from_row(cls, row: Evaluation) -> EvaluationPublic:
        error = None
        if row.error_code:
            error = JobErrorInfo(code=row.error_code, message=row.error_message or "")
        return cls(
            id=row.id,
            model_id=row.model_id,
            dataset_id=row.dataset_id,
            source="validation" if row.source == "validation" else "dataset",
            status=row.status,  # type: ignore[arg-type]
            progress=EvaluationProgress.model_validate(row.progress) if row.progress else None,
            result=EvaluationResult.model_validate(row.result) if row.result else None,
            error=error,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class BatchPredictionProgress(Schema):
    shards_done: int = Field(description="shards written (a shard is batch_shard_size files)")
    shards_total: int | None = Field(description="null until a worker has read the dataset")
    images_done: int = Field(description="files of the shards written")
    images_total: int | None


class BatchPredictionResult(Stored):
    """The output file: GET /v1/batch-predictions/{id}/output."""

    rows: int = Field(description="one per file of the dataset (CSV: not counting the header)")
    errors: int = Field(0, description="rows of files that could not be read or decoded")
    bytes: int
    sha256: str


class BatchPredictionPublic(Schema):
    """A model's top-k labels for every file of a dataset, as one CSV or JSONL file."""

    id: str
    model_id: str
    dataset_id: str | None = Field(description="null: the dataset was deleted since")
    top_k: int = Field(description="labels per file (the output has at most the model's classes)")
    format: Literal["csv", "jsonl"]
    status: Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
    progress: BatchPredictionProgress
    result: BatchPredictionResult | None
    error: JobErrorInfo | None
    attempts: int
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None

    @classmethod
    def from_row(cls, row: BatchPrediction) -> BatchPredictionPublic:
        error = None
        if row.error_code:
            error = JobErrorInfo(code=row.error_code, message=row.error_message or "")
        return cls(
            id=row.id,
            model_id=row.model_id,
            dataset_id=row.dataset_id,
            top_k=row.top_k,
            format="jsonl" if row.format == "jsonl" else "csv",
            status=row.status,  # type: ignore[arg-type]
            progress=BatchPredictionProgress(
                shards_done=row.shards_done,
                shards_total=row.shards_total,
                images_done=row.images_done,
                images_total=row.images_total,
            ),
            result=BatchPredictionResult.model_validate(row.result) if row.result else None,
            error=error,
            attempts=row.attempts,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )
