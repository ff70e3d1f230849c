"""Values PostgreSQL cannot store answer 422, not 500 (found by tests/fuzz).

PostgreSQL text cannot hold a NUL character, so an id, a tenant or a name with one used to
end in an unhandled database error: a 500, and the keep-alive connection closed under the
client's next request. service.http_errors answers such a value as an invalid request.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

MESSAGE = "a value in the request cannot be stored (e.g. a NUL character)"


@pytest.mark.parametrize(
    ("method", "url", "options"),
    [
        ("GET", "/v1/datasets/ds_x%00", {}),
        ("DELETE", "/v1/models/mdl_x%00", {}),
        ("POST", "/v1/jobs/job_x%00/cancel", {}),
        ("GET", "/v1/keys?tenant=z%00", {}),
        ("GET", "/v1/audit?tenant=z%00", {}),
        ("POST", "/v1/jobs", {"json": {"dataset_id": "ds_x\u0000"}}),
    ],
)
def test_a_nul_character_is_an_invalid_request(
    client: httpx.Client, method: str, url: str, options: dict[str, Any]
) -> None:
    response = client.request(method, url, **options)
    assert response.status_code == 422, response.text
    assert response.json() == {
        "error": {"code": "invalid_request", "message": MESSAGE, "details": {}}
    }
    # The connection is still good: the server answered, it did not fail.
    assert client.get("/v1/base-models").status_code == 200


def test_a_nul_character_in_a_name_is_refused_by_the_name_rule(client: httpx.Client) -> None:
    # Names refuse every control character (service.names) before the database sees them.
    body = {"scopes": ["predict"], "name": "bad\u0000name"}
    response = client.post("/v1/keys", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["details"]["field"]) == ("invalid_request", "name")
    assert "U+0000" in error["message"]
    assert client.get("/v1/base-models").status_code == 200
