"""The public shapes of deployments (stable names for served models): requests, answers,
history and figures."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from service.deployments import MAX_TARGETS, NAME_PATTERN, Targets
from service.schema_base import Schema, Stored, Timestamp
from service.schemas import PredictResponse
from service.tables import Deployment, DeploymentChange

MODEL_ID = Field(min_length=1, max_length=40)


class TargetWeight(Schema):
    model_id: str = MODEL_ID
    weight: int = Field(ge=1, le=10_000, strict=True, description="a share of the requests")


class TargetsRequest(Schema):
    """Either `model_id` (all requests) or `targets` (a split by weight), and maybe a shadow."""

    model_id: str | None = Field(None, min_length=1, max_length=40)
    targets: list[TargetWeight] | None = Field(None, min_length=1, max_length=MAX_TARGETS)
    shadow_model_id: str | None = Field(
        None,
        min_length=1,
        max_length=40,
        description="gets a copy of every request; its answers are recorded, never returned",
    )

    def targets_value(self, current: Targets | None = None) -> Targets:
        if self.model_id is not None:
            split: tuple[tuple[str, int], ...] = ((self.model_id, 1),)
        elif self.targets is not None:
            split = tuple((t.model_id, t.weight) for t in self.targets)
        else:
            assert current is not None  # an update that changes only the shadow
            split = current.split
        if "shadow_model_id" in self.model_fields_set or current is None:
            shadow = self.shadow_model_id
        else:
            shadow = current.shadow
        return Targets(split, shadow)


class DeploymentCreate(TargetsRequest):
    """POST /v1/deployments."""

    name: str = Field(max_length=63, pattern=NAME_PATTERN, description="a DNS label: a-z 0-9 -")

    @model_validator(mode="after")
    def _one_target_form(self) -> DeploymentCreate:
        if (self.model_id is None) == (self.targets is None):
            raise ValueError("give exactly one of model_id and targets")
        return self


class DeploymentUpdate(TargetsRequest):
    """PATCH /v1/deployments/{name}: new targets (model_id or targets), a new shadow
    (null removes it), or both; what is not given stays."""

    @model_validator(mode="after")
    def _something(self) -> DeploymentUpdate:
        if self.model_id is not None and self.targets is not None:
            raise ValueError("give model_id or targets, not both")
        if not self.model_fields_set & {"model_id", "targets", "shadow_model_id"}:
            raise ValueError("give model_id, targets or shadow_model_id")
        return self


class TargetsPublic(Stored):
    targets: list[TargetWeight]
    shadow_model_id: str | None


class DeploymentPublic(Schema):
    name: str
    targets: list[TargetWeight] = Field(description="who answers, and each one's share")
    shadow_model_id: str | None
    version: int = Field(description="1 when created, +1 per change")
    created_at: Timestamp
    updated_at: Timestamp

    @classmethod
    def of(cls, row: Deployment, targets: Targets) -> DeploymentPublic:
        data = targets.as_dict()
        return cls(
            name=row.name,
            targets=[TargetWeight(**t) for t in data["targets"]],
            shadow_model_id=targets.shadow,
            version=row.version,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class DeploymentChangePublic(Schema):
    version: int
    action: Literal["created", "updated", "rolled_back"]
    actor: str | None = Field(description="the id of the API key that made the change")
    at: Timestamp
    before: TargetsPublic | None = Field(description="null when it was created")
    after: TargetsPublic

    @classmethod
    def from_row(cls, row: DeploymentChange) -> DeploymentChangePublic:
        return cls(
            version=row.version,
            action=row.action,  # type: ignore[arg-type]
            actor=row.actor,
            at=row.created_at,
            before=TargetsPublic.model_validate(row.before) if row.before else None,
            after=TargetsPublic.model_validate(row.after),
        )


class DeploymentPredictResponse(PredictResponse):
    deployment: str
    version: int = Field(description="the deployment's version that answered")


class LatencyMs(Schema):
    mean: float
    p50: float | None = Field(description="upper bound of the bucket (null: over 10 s)")
    p95: float | None


class Agreement(Schema):
    compared: int = Field(description="images the shadow answered beside a target")
    agreed: int = Field(description="of those, how many got the same first label")


class ModelFigures(Schema):
    model_id: str
    role: Literal["target", "shadow"]
    weight: int | None = Field(description="its share now (null: the shadow, or no longer used)")
    requests: int
    errors: int
    images: int
    latency_ms: LatencyMs | None
    top1_labels: dict[str, int] = Field(description="images per first label, most frequent first")
    agreement: Agreement | None


class DeploymentStatsPublic(Schema):
    deployment: str
    version: int
    models: list[ModelFigures]
