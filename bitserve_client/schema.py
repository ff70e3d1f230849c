"""The JSON shapes the API returns (api.md), as TypedDicts: plain dicts, typed for editors/mypy.

They describe what the server sends; the client does not validate or copy them, so fields a
newer server adds are kept. `total=False` where the contract marks a field optional.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict


class ClassCount(TypedDict):
    name: str
    count: int


class Rejected(TypedDict):
    path: str
    reason: str


class ImageSize(TypedDict):
    median_height: int
    median_width: int


class Dataset(TypedDict):
    id: str
    name: str
    status: str
    num_images: int
    num_classes: int
    classes: list[ClassCount]
    image_size: ImageSize
    rejected: list[Rejected]
    bytes: int
    created_at: str


class PlanEstimate(TypedDict, total=False):
    dataset_id: str
    base_model: str
    validation_fraction: float
    plan: dict[str, Any]
    estimate: dict[str, Any]


class BaseModel(TypedDict, total=False):
    name: str
    architecture: str
    parameters: int
    upstream: str | None
    published: bool
    requires_checkpoint: bool
    checkpoint_present: bool | None
    download_bytes: int | None
    description: str


class Progress(TypedDict, total=False):
    id: str  # in `progress` events only: the job's id
    step: int
    total_steps: int
    loss: float | None
    lr: float | None
    images_per_second: float | None
    eta_seconds: float | None
    phase: str | None


class JobErrorBody(TypedDict):
    code: str
    message: str


class Job(TypedDict, total=False):
    id: str
    name: str | None
    status: str  # queued | running | succeeded | failed | cancelling | cancelled
    dataset_id: str
    base_model: str
    validation_fraction: float
    seed: int
    overrides: dict[str, Any]
    plan: dict[str, Any]
    progress: Progress
    attempts: int
    error: JobErrorBody | None
    model_id: str | None
    metrics: dict[str, Any] | None
    created_at: str
    started_at: str | None
    finished_at: str | None


class Model(TypedDict, total=False):
    id: str
    job_id: str | None
    base_model: str
    name: str | None
    classes: list[str]
    plan: dict[str, Any]
    metrics: dict[str, Any]
    input: dict[str, Any]
    created_at: str


class Label(TypedDict):
    label: str
    score: float


@dataclass(frozen=True)
class JobEvent:
    """One event of a job's stream: `status` (data: the job), `progress` (data: {"id", step,
    total_steps, loss, lr, images_per_second, eta_seconds, phase}) or the final `done` (data:
    the finished job)."""

    event: str
    data: dict[str, Any]
