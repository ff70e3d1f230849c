"""Names refuse control and format characters (issue 11): service.names, and ids that match
their pattern in full."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from service import api_keys
from service.domain_errors import InvalidRequest
from service.ids import is_id, new_id
from service.names import NameStr, check_name


@pytest.mark.parametrize(
    "char", ["\n", "\r", "\x00", "\t", "\x1b", "\x7f", "\u202e", "\u200b", "\u2028", "\u2029"]
)
def test_a_control_or_format_character_is_refused_naming_the_field(char: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_name(f"cats{char}dogs", "name")
    assert caught.value.code == "invalid_request"
    assert caught.value.details == {"field": "name", "character": f"U+{ord(char):04X}"}
    assert char not in caught.value.message  # named, never repeated


@pytest.mark.parametrize("name", ["cats and dogs", "Öl & Brot", "猫", "🐈 v2", "a-b_c.d (1)"])
def test_ordinary_names_pass(name: str) -> None:
    assert check_name(name, "name") == name


def test_name_fields_of_request_bodies_refuse_them() -> None:
    class Body(BaseModel):
        name: NameStr | None = None

    assert Body(name="ok").name == "ok" and Body().name is None
    with pytest.raises(ValidationError, match="control or format characters"):
        Body(name="a\u202eb")


def test_ids_and_tenants_match_in_full_no_trailing_newline() -> None:
    job_id = new_id("job")
    assert is_id(job_id, "job")
    assert not is_id(job_id + "\n", "job")  # re "$" would have matched before the newline
    assert not is_id(job_id + "\nINFO fake", "job")
    assert api_keys.check_tenant("acme") == "acme"
    for tenant in ("acme\n", "acme\r", "acme\x00"):
        with pytest.raises(InvalidRequest):
            api_keys.check_tenant(tenant)
