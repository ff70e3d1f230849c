"""Schemathesis against the live OpenAPI schema of a real server: every /v1 operation.

The schema is the one the running server serves (/openapi.json), so the contract fuzzed is
the one clients get. Each operation gets EXAMPLES_PER_OPERATION examples, valid and invalid
(a fixed seed: CI sends the same requests every run), and every response must pass
tests/fuzz/checks.CHECKS: never a 5xx; a status, content type, headers and body that the
schema documents for the operation; an invalid request never accepted; every error in the
documented shape. A second pass sends no key, or a wrong one: every /v1 route answers 401.

Run alone: `pytest -m fuzz -s` (the requests sent per operation, by status, are printed).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis import APIOperation

from tests.fuzz.checks import CHECKS, SPEC
from tests.fuzz.reach import cases
from tests.fuzz.world import World, fuzz_world

# Bounded so the whole run takes under a minute on a 2-core machine; a fixed seed, so CI sends
# the same requests every run. A deeper or another run, by hand:
# FUZZ_EXAMPLES=300 FUZZ_SEED=7 pytest -m fuzz -s
EXAMPLES_PER_OPERATION = int(os.environ.get("FUZZ_EXAMPLES", "100"))
SEED = int(os.environ.get("FUZZ_SEED", "0"))
SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    print_blob=False,
)
CALLS: dict[str, Counter[int]] = {}


def _v1_operations(spec: dict[str, Any]) -> list[str]:
    return sorted(
        f"{method.upper()} {path}"
        for path, item in spec["paths"].items()
        if path.startswith("/v1/")
        for method in item
    )


# The committed contract (tests/unit/test_openapi_contract.py keeps it equal to the code's);
# test_the_live_schema_is_the_committed_one makes sure no live operation goes unfuzzed.
OPERATIONS = _v1_operations(SPEC)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, postgres_admin_url: str, redis_url: str
) -> Iterator[World]:
    started = time.monotonic()
    with fuzz_world(tmp_path_factory.mktemp("fuzz"), postgres_admin_url, redis_url) as made:
        yield made
        # The run must not have locked itself out: its admin key still works.
        check = httpx.get(f"{made.server.url}/v1/keys", headers=made.server.headers, timeout=30)
        assert check.status_code == 200, check.text
    _report(time.monotonic() - started)


def _report(seconds: float) -> None:
    total = sum(sum(statuses.values()) for statuses in CALLS.values())
    print(f"\nfuzz: {total} requests, {len(CALLS)} operations, {seconds:.0f} s")
    for label, statuses in sorted(CALLS.items()):
        counts = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
        print(f"  {label}: {sum(statuses.values())} ({counts})")


def _record(label: str, status: int) -> None:
    CALLS.setdefault(label, Counter())[status] += 1


@pytest.fixture(scope="module")
def api_schema(world: World) -> schemathesis.BaseSchema:
    # No generated Authorization / X-API-Key: each pass sends the keys it means to.
    config = schemathesis.Config.from_dict({"generation": {"with-security-parameters": False}})
    return schemathesis.openapi.from_url(
        f"{world.server.url}/openapi.json", config=config, timeout=30
    )


def test_the_live_schema_is_the_committed_one(api_schema: schemathesis.BaseSchema) -> None:
    assert _v1_operations(api_schema.raw_schema) == OPERATIONS
    assert len(OPERATIONS) == 43


@pytest.mark.parametrize("label", OPERATIONS)
def test_operation_keeps_its_contract(
    label: str, api_schema: schemathesis.BaseSchema, world: World
) -> None:
    method, path = label.split(" ")
    operation = api_schema[path][method]

    @SETTINGS
    @hypothesis.seed(SEED)
    @hypothesis.given(case=cases(world, operation))
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call_and_validate(headers=world.server.headers, checks=CHECKS, timeout=30)
        _record(label, response.status_code)

    before = sum(CALLS.get(label, Counter()).values())
    fuzz()
    # Every example reached the server and passed every check (a failed check raises above).
    assert sum(CALLS[label].values()) > before
    assert all(status < 500 for status in CALLS[label])


UNAUTHENTICATED_EXAMPLES = 5
# No key, a well-formed key that does not exist, garbage in the other header.
WRONG_KEYS: dict[str, dict[str, str]] = {
    "none": {},
    "unknown": {"Authorization": "Bearer bsk_" + "0" * 40},
    "garbage": {"X-API-Key": "not a key"},
}


def _refuses(world: World, operation: APIOperation, headers: dict[str, str]) -> None:
    @hypothesis.settings(SETTINGS, max_examples=UNAUTHENTICATED_EXAMPLES)
    @hypothesis.seed(SEED)
    @hypothesis.given(case=cases(world, operation))
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call(headers=headers, timeout=30)
        case.validate_response(response, checks=CHECKS)
        # A body that does not parse is refused before the key is read (docs/security.md).
        unparseable = response.status_code == 400 and "malformed_request" in response.text
        assert response.status_code == 401 or unparseable, f"{operation.label}: {response.text}"
        _record(f"{operation.label} (no valid key)", response.status_code)

    fuzz()
    assert set(CALLS[f"{operation.label} (no valid key)"]) <= {400, 401}


@pytest.mark.parametrize("key", sorted(WRONG_KEYS))
def test_every_operation_refuses_a_missing_or_wrong_key(
    key: str, api_schema: schemathesis.BaseSchema, world: World
) -> None:
    for label in OPERATIONS:
        method, path = label.split(" ")
        _refuses(world, api_schema[path][method], WRONG_KEYS[key])
    refused = [label for label in CALLS if label.endswith("(no valid key)")]
    assert len(refused) == len(OPERATIONS)
