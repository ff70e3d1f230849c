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
        ("POST", "/v1/keys", {"json": {"scopes": ["predict"], "name": "bad\u0000name"}}),
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
