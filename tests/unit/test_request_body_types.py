"""JSON request bodies take numbers and booleans as they are typed, nothing coerced.

pydantic's lax mode read `{"max_active_jobs": true}` as a quota of 1 job, `"expires_days": true`
as one day, `"global_admin": 1` as a global admin key (found by tests/fuzz: the schema says
integer, number or boolean, and the API accepted the request). These fields are strict now.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from service.admin_schemas import KeyCreate, QuotasUpdate
from service.routers.jobs import JobCreate

JOB = {"dataset_id": "ds_x"}
KEY = {"scopes": ["predict"]}


@pytest.mark.parametrize(
    ("model", "base", "field", "value"),
    [
        (QuotasUpdate, {}, "max_active_jobs", True),
        (QuotasUpdate, {}, "max_active_jobs", "5"),
        (QuotasUpdate, {}, "max_stored_bytes", True),
        (QuotasUpdate, {}, "predict_rate_per_second", True),
        (QuotasUpdate, {}, "predict_rate_per_second", "2.5"),
        (KeyCreate, KEY, "expires_days", True),
        (KeyCreate, KEY, "global_admin", 1),
        (KeyCreate, KEY, "global_admin", "true"),
        (JobCreate, JOB, "seed", True),
        (JobCreate, JOB, "validation_fraction", False),
    ],
)
def test_a_value_of_another_type_is_refused(
    model: type[BaseModel], base: dict[str, Any], field: str, value: object
) -> None:
    with pytest.raises(ValidationError) as refused:
        model.model_validate({**base, field: value})
    assert [error["loc"] for error in refused.value.errors()] == [(field,)]


def test_values_of_the_documented_types_still_pass() -> None:
    quotas = QuotasUpdate.model_validate(
        {"max_active_jobs": 3, "max_stored_bytes": 10**9, "predict_rate_per_second": 2}
    )
    assert (quotas.max_active_jobs, quotas.predict_rate_per_second) == (3, 2.0)
    key = KeyCreate.model_validate({**KEY, "expires_days": 30, "global_admin": True})
    assert (key.expires_days, key.global_admin) == (30.0, True)
    job = JobCreate.model_validate({**JOB, "seed": 7, "validation_fraction": 0})
    assert (job.seed, job.validation_fraction) == (7, 0.0)
