"""The published contract: /openapi.json names a schema for every answer of every /v1 route.

Walks every route the app has, so a route added later without a response model, or with an
undocumented error shape, fails here without anyone editing this test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute

from bitcore.train.callbacks import Phase
from service.app import create_app
from service.job_states import JobStatus
from service.settings import Settings

METHODS = ("get", "post", "put", "patch", "delete")
# Answers that are not JSON: the artifact download, the job event stream, curves as CSV.
NON_JSON = {
    "application/zip": "binary",
    "application/octet-stream": "binary",  # the .onnx export
    "image/jpeg": "binary",  # an evaluation's example thumbnail
    "text/event-stream": None,
    "text/csv": None,  # GET /v1/jobs/{id}/metrics with Accept: text/csv; a batch's output
    "application/x-ndjson": None,  # a batch prediction's output as JSON lines
}


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    app = create_app(Settings(home=tmp_path_factory.mktemp("home")))
    hidden = [r.path for r in app.routes if isinstance(r, APIRoute) and not r.include_in_schema]
    assert not [p for p in hidden if p.startswith("/v1")], "a /v1 route hidden from the schema"
    document: dict[str, Any] = app.openapi()
    return document


def v1_operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in spec["paths"].items()
        if path.startswith("/v1/")
        for method, operation in item.items()
        if method in METHODS
    ]


def resolve(spec: dict[str, Any], ref: str) -> dict[str, Any]:
    schema: dict[str, Any] = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    return schema


def test_the_walk_covers_every_v1_route(spec: dict[str, Any]) -> None:
    operations = {(path, method) for path, method, _ in v1_operations(spec)}
    assert len(operations) == 43
    assert ("/v1/deployments/{name}/predict", "post") in operations
    assert ("/v1/deployments/{name}/rollback", "post") in operations
    assert ("/v1/deployments/{name}", "patch") in operations
    assert ("/v1/jobs/{job_id}/metrics", "get") in operations
    assert ("/v1/models/{model_id}/evaluations", "post") in operations
    assert ("/v1/evaluations/{evaluation_id}/examples/{index}", "get") in operations
    assert ("/v1/models/{model_id}/batch-predictions", "post") in operations
    assert ("/v1/batch-predictions/{batch_prediction_id}/output", "get") in operations
    assert ("/v1/tenants/{tenant}/quotas", "put") in operations
    assert ("/v1/audit", "get") in operations
    assert ("/v1/models/{model_id}/predict", "post") in operations
    assert ("/v1/jobs/{job_id}/events", "get") in operations


def test_every_success_answer_has_a_named_schema(spec: dict[str, Any]) -> None:
    bare = []
    for path, method, operation in v1_operations(spec):
        successes = {s: r for s, r in operation["responses"].items() if s.startswith("2")}
        assert successes, f"{method.upper()} {path} documents no success"
        for status, response in successes.items():
            content = response.get("content", {})
            if status == "204":
                assert not content, f"{method.upper()} {path} 204 has a body"
                continue
            assert content, f"{method.upper()} {path} {status} has no content"
            for media, body in content.items():
                schema = body.get("schema", {})
                if media in NON_JSON:
                    assert schema.get("type") == "string", (path, media)
                    assert schema.get("format") == NON_JSON[media], (path, media)
                    continue
                ref = schema.get("$ref")
                if ref is None or not resolve(spec, ref).get("properties"):
                    bare.append(f"{method.upper()} {path} {status} {media}: {schema}")
    assert bare == []


def test_every_error_answer_is_the_error_body(spec: dict[str, Any]) -> None:
    wrong = []
    for path, method, operation in v1_operations(spec):
        errors = {s: r for s, r in operation["responses"].items() if s[0] in "45"}
        if "{" in path:  # an id in the path: unknown or not yours is 404
            assert "404" in errors, f"{method.upper()} {path} does not document 404"
        for status, response in errors.items():
            schema = response["content"]["application/json"]["schema"]
            if schema != {"$ref": "#/components/schemas/ErrorBody"}:
                wrong.append(f"{method.upper()} {path} {status}: {schema}")
    assert wrong == []
    # FastAPI's own validation-error shape is never published: ours replaces it.
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    body = spec["components"]["schemas"]["ErrorBody"]
    assert body["required"] == ["error"]
    info = spec["components"]["schemas"]["ErrorInfo"]
    assert sorted(info["required"]) == ["code", "details", "message"]


def test_every_route_with_a_body_documents_the_malformed_body(spec: dict[str, Any]) -> None:
    """A body that does not parse is a 400 on any route that takes one (found by tests/fuzz)."""
    undocumented = [
        f"{method.upper()} {path}"
        for path, method, operation in v1_operations(spec)
        if "requestBody" in operation and "400" not in operation["responses"]
    ]
    assert undocumented == []


def test_the_job_states_and_progress_phases_are_published(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert schemas["JobStatus"]["enum"] == [s.value for s in JobStatus]
    assert schemas["JobStatus"]["enum"] == [
        "queued",
        "running",
        "cancelling",
        "succeeded",
        "failed",
        "cancelled",
    ]
    assert schemas["JobPublic"]["properties"]["status"] == {
        "$ref": "#/components/schemas/JobStatus"
    }
    phase = schemas["Progress"]["properties"]["phase"]["anyOf"][0]
    assert phase["enum"] == ["downloading", "preparing", "training", "evaluating", "done"]
    assert list(Phase.__args__) == phase["enum"]
    listing = next(
        p for p in spec["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "status"
    )
    assert listing["schema"]["anyOf"][0] == {"$ref": "#/components/schemas/JobStatus"}


def test_the_document_is_written_as_served(spec: dict[str, Any], tmp_path: Path) -> None:
    # The contract file in docs/ is this document; regenerate it with
    # `python -m service.openapi docs/openapi.json` when a schema changes.
    import json

    from service.openapi import render

    written = (Path(__file__).resolve().parents[2] / "docs" / "openapi.json").read_text()
    assert json.loads(written) == json.loads(render(spec))
