"""The client's types of evaluations and batch predictions (bitserve_client.schema names them
too): the same shapes as the server's, checked by tests/unit/test_client_schema.py."""

from __future__ import annotations

from typing import Literal, TypedDict

from bitserve_client.schema import ClassMetrics, JobErrorBody, JobStatus


class ConfusedPair(TypedDict):
    label: str
    predicted: str
    count: int


class WorstExample(TypedDict):
    index: int
    path: str
    label: str
    predicted: str
    label_score: float
    predicted_score: float


class EvaluationResult(TypedDict):
    accuracy: float | None
    loss: float | None
    macro_f1: float | None
    num_examples: int
    per_class: list[ClassMetrics]
    confusion_matrix: list[list[int]]
    top_k_accuracy: dict[str, float] | None
    most_confused: list[ConfusedPair]
    classes: list[str]
    labels_evaluated: list[str]
    skipped: int
    worst: list[WorstExample]


class EvaluationProgress(TypedDict):
    done: int
    total: int | None


class Evaluation(TypedDict):
    """POST /v1/models/{id}/evaluations, GET /v1/evaluations/{id}."""

    id: str
    model_id: str
    dataset_id: str | None
    source: Literal["validation", "dataset"]
    status: Literal["queued", "running", "succeeded", "failed"]
    progress: EvaluationProgress | None
    result: EvaluationResult | None
    error: JobErrorBody | None
    created_at: str
    started_at: str | None
    finished_at: str | None


class BatchPredictionProgress(TypedDict):
    shards_done: int
    shards_total: int | None
    images_done: int
    images_total: int | None


class BatchPredictionResult(TypedDict):
    rows: int
    errors: int
    bytes: int
    sha256: str


class BatchPrediction(TypedDict):
    """POST /v1/models/{id}/batch-predictions, GET /v1/batch-predictions/{id}."""

    id: str
    model_id: str
    dataset_id: str | None
    top_k: int
    format: Literal["csv", "jsonl"]
    status: JobStatus
    progress: BatchPredictionProgress
    result: BatchPredictionResult | None
    error: JobErrorBody | None
    attempts: int
    created_at: str
    started_at: str | None
    finished_at: str | None
