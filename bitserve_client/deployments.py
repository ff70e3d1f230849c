"""The deployment calls (stable names for served models; BitserveClient inherits them):
create, read, change, roll back and delete a name, its history and figures, and predict
through it.

    api.create_deployment("pets", model_id)                      # all requests to one model
    api.update_deployment("pets", targets=[(new, 90), (old, 10)], shadow_model_id=candidate)
    api.predict_deployment("pets", ["cat.jpg"])["model_id"]      # the model that answered
    api.rollback_deployment("pets")                              # back to before the change
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

from bitserve_client.files import ImageInput, image_parts
from bitserve_client.schema import (
    Deployment,
    DeploymentChange,
    DeploymentPrediction,
    DeploymentStats,
    TargetWeight,
)
from bitserve_client.transport import PAGE_SIZE, Transport, seg

# A split as the caller writes it: [("mdl_a", 90), ("mdl_b", 10)] or the API's own dicts.
TargetsInput = Iterable[tuple[str, int] | Mapping[str, Any]]


class _Unset(enum.Enum):
    """The default of update_deployment's shadow_model_id: "leave it", since None removes it."""

    UNSET = "unset"


UNSET = _Unset.UNSET


class DeploymentMethods(Transport):
    """/v1/deployments (retries and errors: bitserve_client.client)."""

    def create_deployment(
        self,
        name: str,
        model_id: str | None = None,
        *,
        targets: TargetsInput | None = None,
        shadow_model_id: str | None = None,
    ) -> Deployment:
        """Name one model (`model_id`), or split the requests by weight (`targets`: 2 to 5
        (model_id, weight) pairs or {"model_id", "weight"} dicts); a shadow gets a copy of each
        request, its answers only recorded in the stats. The server loads and warms the models
        before it answers. ApiError 409 `deployment_exists`, 404 `not_found` (a model),
        422 `classes_differ`."""
        if (model_id is None) == (targets is None):
            raise ValueError("give exactly one of model_id and targets")
        body: dict[str, Any] = {"name": name, **_targets_body(model_id, targets)}
        if shadow_model_id is not None:
            body["shadow_model_id"] = shadow_model_id
        # Not sent again after a lost answer: a second try would answer deployment_exists.
        return cast(Deployment, self._request("POST", "/v1/deployments", json=body).json())

    def list_deployments(self, *, page_size: int = PAGE_SIZE) -> Iterator[Deployment]:
        """Every deployment of the key's tenant, newest first, page by page."""
        return cast(Iterator[Deployment], self._pages("/v1/deployments", {}, page_size))

    def get_deployment(self, name: str) -> Deployment:
        return cast(Deployment, self._get(f"/v1/deployments/{seg(name)}"))

    def update_deployment(
        self,
        name: str,
        *,
        model_id: str | None = None,
        targets: TargetsInput | None = None,
        shadow_model_id: str | _Unset | None = UNSET,
    ) -> Deployment:
        """Point the name at another model (`model_id`) or split (`targets`), and/or set its
        shadow (`shadow_model_id`; None removes it); what is not given stays. The new models
        are warmed before the change; an identical change answers the deployment as it is
        (same version)."""
        if model_id is not None and targets is not None:
            raise ValueError("give model_id or targets, not both")
        body: dict[str, Any] = (
            _targets_body(model_id, targets) if model_id is not None or targets is not None else {}
        )
        if shadow_model_id is not UNSET:
            body["shadow_model_id"] = shadow_model_id
        if not body:
            raise ValueError("give model_id, targets or shadow_model_id")
        # The body states the whole new target set, and the same set again changes nothing:
        # safe to send again after a lost answer.
        answer = self._request("PATCH", f"/v1/deployments/{seg(name)}", json=body, idempotent=True)
        return cast(Deployment, answer.json())

    def delete_deployment(self, name: str) -> None:
        """The name stops answering; its models stay."""
        self._request("DELETE", f"/v1/deployments/{seg(name)}")

    def rollback_deployment(self, name: str) -> Deployment:
        """Back to the targets and shadow it had before its latest change (a change of its
        own, action `rolled_back`). ApiError 409 `nothing_to_roll_back` at version 1."""
        # Not sent again after a lost answer: a second rollback undoes the first.
        path = f"/v1/deployments/{seg(name)}/rollback"
        return cast(Deployment, self._request("POST", path).json())

    def deployment_history(
        self, name: str, *, page_size: int = PAGE_SIZE
    ) -> Iterator[DeploymentChange]:
        """Every change of the deployment, newest first: who, when, from what, to what."""
        path = f"/v1/deployments/{seg(name)}/history"
        return cast(Iterator[DeploymentChange], self._pages(path, {}, page_size))

    def deployment_stats(self, name: str) -> DeploymentStats:
        """Requests, errors, images, latency, first labels (and a shadow's agreement) per model
        that answered through the name, summed over every gateway."""
        return cast(DeploymentStats, self._get(f"/v1/deployments/{seg(name)}/stats"))

    def predict_deployment(
        self, name: str, images: Sequence[ImageInput], top_k: int = 5
    ) -> DeploymentPrediction:
        """Classify images (paths, encoded bytes or PIL images) with the model the deployment
        picks: the whole answer, with `model_id` (who answered), the deployment's `version`
        and per image its top_k labels (as predict returns them)."""
        parts = image_parts(images)
        response = self._request(
            "POST",
            f"/v1/deployments/{seg(name)}/predict",
            params={"top_k": top_k},
            files=lambda _: parts,
            idempotent=True,  # a pure function of the models and the images
        )
        return cast(DeploymentPrediction, response.json())


def _targets_body(model_id: str | None, targets: TargetsInput | None) -> dict[str, Any]:
    if model_id is not None:
        return {"model_id": model_id}
    assert targets is not None
    return {"targets": [_target(item) for item in targets]}


def _target(item: tuple[str, int] | Mapping[str, Any]) -> TargetWeight:
    if isinstance(item, Mapping):
        if set(item) != {"model_id", "weight"}:
            raise ValueError(f"a target is {{'model_id', 'weight'}}, got keys {sorted(item)}")
        model_id, weight = item["model_id"], item["weight"]
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        model_id, weight = item
    else:
        raise TypeError(f"a target is (model_id, weight) or a dict, got {item!r}")
    if not isinstance(model_id, str) or isinstance(weight, bool) or not isinstance(weight, int):
        raise TypeError(f"a target is (model_id: str, weight: int), got {item!r}")
    return {"model_id": model_id, "weight": weight}
