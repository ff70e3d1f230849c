"""What every fuzzed response must satisfy, beyond schemathesis's own schema checks.

- Every error (4xx, 5xx) has the documented body: application/json
  {"error": {"code", "message", "details"?}}, a `code` that docs/api.md lists, Retry-After on
  429/503 and WWW-Authenticate on 401 (docs/api.md, "Errors").
- The job and dataset event streams are checked event by event. Their OpenAPI 3.1 entries
  document the body as a string, while schemathesis reads a 3.1 `text/event-stream` schema as
  the schema of each event, so the events are checked against what the routes document in
  words instead: `status` and `done` carry a JobPublic (a DatasetPublic), `progress` the job's
  Progress (the dataset's IngestProgress) plus its `id`, and the stream ends with `done`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import schemathesis
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC: dict[str, Any] = json.loads((REPO_ROOT / "docs" / "openapi.json").read_text("utf-8"))
DOCUMENTED_CODES = frozenset(
    re.findall(r"`([a-z][a-z0-9_]*)`", (REPO_ROOT / "docs" / "api.md").read_text("utf-8"))
)
JOB_PUBLIC = jsonschema_rs.validator_for(
    {"$ref": "#/components/schemas/JobPublic", "components": SPEC["components"]}
)
DATASET_PUBLIC = jsonschema_rs.validator_for(
    {"$ref": "#/components/schemas/DatasetPublic", "components": SPEC["components"]}
)


def _content_type(response: Any) -> str:
    values = response.headers.get("content-type") or [""]
    return str(values[0])


def error_body_is_documented(ctx: CheckContext, response: Any, case: schemathesis.Case) -> None:
    if response.status_code < 400:
        return
    assert _content_type(response).startswith("application/json"), _content_type(response)
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and {"code", "message"} <= set(error), error
    assert set(error) <= {"code", "message", "details"}, error
    assert isinstance(error["code"], str) and error["code"] in DOCUMENTED_CODES, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error.get("details", {}), dict), error
    if response.status_code in (429, 503):
        assert "retry-after" in response.headers, response.headers
    if response.status_code == 401:
        assert "www-authenticate" in response.headers, response.headers


def events(text: str) -> list[tuple[str, Any]]:
    """(event name, parsed JSON data) of each Server-Sent Event; comments (pings) skipped."""
    found = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(
            line.split(": ", 1)
            for line in block.splitlines()
            if ": " in line and not line.startswith(":")
        )
        if fields:
            found.append((fields.get("event", ""), json.loads(fields["data"])))
    return found


def body_matches_the_schema(
    ctx: CheckContext, response: Any, case: schemathesis.Case
) -> bool | None:
    """response_schema_conformance; an event stream event by event (module docstring)."""
    if not (
        response.status_code == 200 and _content_type(response).startswith("text/event-stream")
    ):
        return response_schema_conformance(ctx, response, case)
    stream = events(response.text)
    params = case.path_parameters or {}
    # /v1/jobs/{job_id}/events or /v1/datasets/{dataset_id}/events
    kind = "job_id" if "job_id" in params else "dataset_id"
    public = JOB_PUBLIC if kind == "job_id" else DATASET_PUBLIC
    assert stream and stream[-1][0] == "done", stream
    for name, data in stream:
        assert name in ("status", "progress", "done"), name
        assert data["id"] == params[kind], data
        if name != "progress":
            public.validate(data)
    return True


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    body_matches_the_schema,
    negative_data_rejection,
    error_body_is_documented,
]
