"""Cases that reach past the 404: generated requests, some with the ids of real objects.

Random ids only ever meet "not found", so part of the examples are given the ids of the
objects tests/fuzz/world.py made (and, for the upload, job and predict routes, a valid body).
Valid requests get both swaps while they are generated (hooks), so schemathesis still knows
them as valid. Invalid requests keep their body; their path gets a real id afterwards, unless
the path is what was made invalid, so e.g. a bad plan query meets a real dataset.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import strategies as st
from schemathesis import APIOperation, GenerationMode
from schemathesis.core.parameters import ParameterLocation
from schemathesis.hooks import HookContext, HookDispatcher, HookScope

from tests.fuzz.world import World


def real_ids(world: World, method: str, path: str) -> dict[str, list[str]]:
    """Real ids per path parameter of this operation; destroying routes get their own."""
    if path.endswith("/events"):
        # Streams that end at once: a queued job's would never end, a ready dataset's does.
        return {"job_id": [world.finished_job], "dataset_id": [world.dataset]}
    if method == "DELETE":
        return {
            "dataset_id": [world.dataset, *world.doomed_datasets],
            "model_id": world.doomed_models,
            "key_id": world.doomed_keys,  # never the key the fuzzer sends
            "name": world.doomed_deployments,
        }
    return {
        "dataset_id": [world.dataset],
        "model_id": [world.model],
        "job_id": [world.queued_job, world.finished_job],
        "evaluation_id": [world.evaluation],
        "batch_prediction_id": [world.batch_prediction],
        "tenant": [world.tenant],
        "name": [world.deployment],
    }


def valid_body(world: World, method: str, path: str, body: Any) -> Any:
    """A body the route accepts, or None where generated bodies reach far enough."""
    bodies = world.valid_bodies
    if (method, path) == ("POST", "/v1/jobs"):
        return bodies["job"]
    if (method, path) == ("POST", "/v1/datasets"):
        # Multipart (an archive) or JSON (a source): a JSON case cannot carry the archive's
        # bytes; a source under no allowed bucket still reaches the route's checks.
        multipart = isinstance(body, dict) and "file" in body and "source" not in body
        return bodies["dataset"] if multipart else bodies["dataset_source"]
    # These two take JSON (a stored dataset's id) or an archive beside form fields.
    sent_archive = isinstance(body, dict) and "file" in body and "dataset_id" not in body
    if (method, path) == ("POST", "/v1/models/{model_id}/evaluations"):
        return bodies["evaluation_archive"] if sent_archive else bodies["evaluation"]
    if (method, path) == ("POST", "/v1/models/{model_id}/batch-predictions"):
        return bodies["batch_archive"] if sent_archive else bodies["batch_prediction"]
    if (method, path) == ("POST", "/v1/deployments"):
        return bodies["deployment"]
    if (method, path) == ("PATCH", "/v1/deployments/{name}"):
        return bodies["deployment_update"]
    if path.endswith("/predict"):
        multipart = isinstance(body, dict) and "files" in body
        return bodies["predict_files"] if multipart else bodies["predict_json"]
    return None


def _path_choices(world: World, operation: APIOperation, params: dict[str, Any] | None) -> Any:
    if not params:
        return st.just(params)
    real = real_ids(world, operation.method.upper(), operation.path)
    return st.fixed_dictionaries(
        {name: st.sampled_from([value, *real.get(name, [])]) for name, value in params.items()}
    )


def _reaching_hooks(world: World) -> HookDispatcher:
    hooks = HookDispatcher(scope=HookScope.TEST)

    def flatmap_path_parameters(context: HookContext, path_parameters: Any) -> Any:
        assert context.operation is not None
        return _path_choices(world, context.operation, path_parameters)

    def flatmap_body(context: HookContext, body: Any) -> Any:
        operation = context.operation
        assert operation is not None
        valid = valid_body(world, operation.method.upper(), operation.path, body)
        return st.just(body) if valid is None else st.sampled_from([body, valid])

    hooks.register_hook_with_name(flatmap_path_parameters, "flatmap_path_parameters")
    hooks.register_hook_with_name(flatmap_body, "flatmap_body")
    return hooks


def _with_real_path(world: World, case: schemathesis.Case) -> Any:
    meta = case.meta
    if meta is not None and meta.is_negative_at(ParameterLocation.PATH):
        return st.just(case)

    def with_path(params: dict[str, Any] | None) -> schemathesis.Case:
        if params:
            case.path_parameters = params
        return case

    return _path_choices(world, case.operation, case.path_parameters).map(with_path)


def cases(world: World, operation: APIOperation) -> st.SearchStrategy[schemathesis.Case]:
    """Valid requests and invalid ones (wrong types, missing fields, out-of-range values)."""
    return st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE, hooks=_reaching_hooks(world)),
        operation.as_strategy(GenerationMode.NEGATIVE).flatmap(
            lambda case: _with_real_path(world, case)
        ),
    )
