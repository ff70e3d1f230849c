"""The Python client's types (bitserve_client.schema) against the server's /openapi.json:
the same fields, of the same types, for every shape the client names."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest

from bitserve_client import schema as client
from bitserve_client import schema_scoring
from service.openapi import build

# client TypedDict -> the server's schema of the same shape
SAME_SHAPE = {
    "ClassCount": "ClassCount",
    "Rejected": "RejectedFile",
    "ImageSize": "ImageSize",
    "Dataset": "DatasetPublic",
    "IngestProgress": "IngestProgress",
    "ErrorInfo": "ErrorInfo",
    "PlanSource": "PlanSource",
    "Plan": "Plan",
    "Overrides": "Overrides",
    "WorkEstimate": "WorkEstimate",
    "JobCost": "JobCost",
    "PlanEstimate": "DatasetPlan",
    "BaseModel": "BaseModelPublic",
    "Progress": "Progress",
    "JobErrorBody": "JobErrorInfo",
    "ClassMetrics": "ClassMetrics",
    "Metrics": "Metrics",
    "PrecisionCheck": "PrecisionCheck",
    "Job": "JobPublic",
    "DeployOutcome": "DeployOutcome",
    "TrainingPoint": "TrainingPoint",
    "ValidationPoint": "ValidationPoint",
    "ScheduleMarks": "ScheduleMarks",
    "JobMetrics": "JobMetricsPublic",
    "ConfusedPair": "ConfusedPair",
    "WorstExample": "WorstExample",
    "EvaluationResult": "EvaluationResult",
    "EvaluationProgress": "EvaluationProgress",
    "Evaluation": "EvaluationPublic",
    "BatchPredictionProgress": "BatchPredictionProgress",
    "BatchPredictionResult": "BatchPredictionResult",
    "BatchPrediction": "BatchPredictionPublic",
    "InputSpec": "InputSpec",
    "Model": "ModelPublic",
    "Label": "Label",
    "ImagePrediction": "ImagePrediction",
    "Predictions": "PredictResponse",
    "QuotaUsage": "QuotaUsage",
    "TenantQuotas": "TenantQuotas",
    "ApiKey": "KeyPublic",
    "CreatedKey": "KeyCreated",
    "AuditEvent": "AuditEventPublic",
    "TargetWeight": "TargetWeight",
    "Deployment": "DeploymentPublic",
    "Targets": "TargetsPublic",
    "DeploymentChange": "DeploymentChangePublic",
    "DeploymentPrediction": "DeploymentPredictResponse",
    "LatencyMs": "LatencyMs",
    "Agreement": "Agreement",
    "ModelFigures": "ModelFigures",
    "DeploymentStats": "DeploymentStatsPublic",
}
SERVER_TO_CLIENT = {server: name for name, server in SAME_SHAPE.items()}


@pytest.fixture(scope="module")
def schemas() -> dict[str, Any]:
    components: dict[str, Any] = build()["components"]["schemas"]
    return components


def from_schema(schema: dict[str, Any], schemas: dict[str, Any]) -> str:
    """A canonical spelling of a JSON schema's type, e.g. "list[Label]|None"."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        target = schemas[name]
        if "enum" in target:
            return from_schema(target, schemas)
        return SERVER_TO_CLIENT.get(name, "dict")
    if "anyOf" in schema:
        options = [from_schema(s, schemas) for s in schema["anyOf"] if s.get("type") != "null"]
        nullable = any(s.get("type") == "null" for s in schema["anyOf"])
        return "|".join(sorted(options)) + ("|None" if nullable else "")
    if "enum" in schema:
        return "enum" + repr(sorted(schema["enum"]))
    if "const" in schema:
        return "enum" + repr([schema["const"]])
    kind = schema.get("type")
    if kind == "array":
        return f"list[{from_schema(schema['items'], schemas)}]"
    simple = {"integer": "int", "number": "float", "string": "str", "boolean": "bool"}
    return simple.get(kind, "dict")


def from_annotation(annotation: Any) -> str:
    """The same canonical spelling for a Python annotation of the client."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        nullable = len(options) < len(get_args(annotation))
        return "|".join(sorted(from_annotation(a) for a in options)) + ("|None" if nullable else "")
    if origin is Literal:
        return "enum" + repr(sorted(get_args(annotation)))
    if origin is list:
        return f"list[{from_annotation(get_args(annotation)[0])}]"
    if origin is dict or annotation is Any:
        return "dict"
    if typing.is_typeddict(annotation):
        return str(annotation.__name__)
    return {int: "int", float: "float", str: "str", bool: "bool"}[annotation]


@pytest.mark.parametrize("name", sorted(SAME_SHAPE))
def test_client_type_matches_the_server_schema(name: str, schemas: dict[str, Any]) -> None:
    server = schemas[SAME_SHAPE[name]]
    hints = get_type_hints(getattr(client, name, None) or getattr(schema_scoring, name))
    assert set(hints) == set(server["properties"]), f"{name} vs {SAME_SHAPE[name]}"
    mismatched = {
        field: (from_annotation(hints[field]), from_schema(spec, schemas))
        for field, spec in server["properties"].items()
        if from_annotation(hints[field]) != from_schema(spec, schemas)
    }
    assert mismatched == {}


def test_every_response_schema_has_a_client_type(schemas: dict[str, Any]) -> None:
    # Pages, errors and health answers are unwrapped by the client itself.
    unwrapped = {"ErrorBody", "Health", "Ready", "JobStatus", "Scope"}
    pages = {name for name in schemas if name.startswith("Page_")}
    requests = {
        "JobCreate",
        "EvaluationCreate",
        "BatchPredictionCreate",
        "OverridesRequest",
        "KeyCreate",
        "QuotasUpdate",
        "DeploymentCreate",
        "DeploymentUpdate",
        "ValidationError",
    }
    assert set(schemas) - unwrapped - pages - requests == set(SERVER_TO_CLIENT)


def test_the_comparison_sees_a_difference() -> None:
    class Wrong(typing.TypedDict):
        label: str
        score: int

    assert from_annotation(get_type_hints(Wrong)["score"]) == "int"
    assert from_schema({"type": "number"}, {}) == "float"
    status = from_annotation(client.JobStatus)
    assert status == from_schema(
        {"enum": ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]}, {}
    )
    assert from_annotation(get_type_hints(client.Job)["error"]) == "JobErrorBody|None"
