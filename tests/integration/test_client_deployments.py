"""bitserve_client's deployment calls against a REAL uvicorn server on PostgreSQL + Redis (the
session's server, tests/integration/conftest.py): a name created, predicted through (the same
answer as the model's own route), changed, rolled back, listed in its history and deleted; the
figures of a target and its shadow; bad input refused on this side or with the server's code.

The models are tiny-R10x0.25 networks with seeded random weights, published straight into
the server's database and store (tests.model_fixtures.publish_model): no training needed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bitcore.models import create_model
from bitserve_client import ApiError, BitserveClient, DeploymentStats
from bitserve_client.schema import Targets
from tests.imagegen import class_image, encode
from tests.integration.conftest import LiveServer
from tests.model_fixtures import publish_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CLASSES = ["ant", "bee", "cow"]


def png(seed: int) -> bytes:
    return encode(class_image(seed % 3, 3, (40, 48), seed=seed), "PNG")


def publish(server: LiveServer, seed: int) -> str:
    torch.manual_seed(seed)
    model = create_model("tiny-R10x0.25", len(CLASSES))
    state = server.app.state
    model_id, _ = publish_model(state.db, state.storage, model, "tiny-R10x0.25", CLASSES, 32)
    return model_id


def unique(prefix: str) -> str:
    """A name no other test of the session's server uses (names are per tenant, and every
    test here shares the default tenant)."""
    return f"{prefix}-{time.monotonic_ns() % 10**9}"


@pytest.fixture(scope="module")
def models(live_server_instance: LiveServer) -> dict[str, str]:
    return {name: publish(live_server_instance, 100 + i) for i, name in enumerate("abc")}


@pytest.fixture
def api(live_server_instance: LiveServer) -> Iterator[BitserveClient]:
    server = live_server_instance
    with BitserveClient(server.url, api_key=server.key, timeout=60) as client:
        yield client


def one(model_id: str, shadow: str | None = None) -> Targets:
    return {"targets": [{"model_id": model_id, "weight": 1}], "shadow_model_id": shadow}


def test_a_deployment_round_trips_through_the_client(
    api: BitserveClient, models: dict[str, str], tmp_path: Path
) -> None:
    a, b, c = models["a"], models["b"], models["c"]
    name = unique("pets")
    created = api.create_deployment(name, a)
    assert {k: created[k] for k in ("name", "targets", "shadow_model_id", "version")} == {
        "name": name,
        "targets": [{"model_id": a, "weight": 1}],
        "shadow_model_id": None,
        "version": 1,
    }
    assert api.get_deployment(name) == created
    listed = list(api.list_deployments(page_size=1))  # one page per deployment
    assert created in listed and len({d["name"] for d in listed}) == len(listed)

    # The name answers as the model's own route does (a path, bytes: any predict input).
    image = tmp_path / "cat.png"
    image.write_bytes(png(1))
    answer = api.predict_deployment(name, [image, png(2)], top_k=2)
    assert (answer["deployment"], answer["version"], answer["model_id"]) == (name, 1, a)
    assert [p["top_k"] for p in answer["predictions"]] == api.predict(a, [png(1), png(2)], top_k=2)
    assert all(len(p["top_k"]) == 2 for p in answer["predictions"])

    assert api.update_deployment(name, model_id=b)["version"] == 2
    assert api.predict_deployment(name, [png(1)])["model_id"] == b
    assert api.update_deployment(name, model_id=b)["version"] == 2  # the same: no change
    split = api.update_deployment(name, targets=[(a, 90), {"model_id": b, "weight": 10}])
    assert (split["version"], split["targets"], split["shadow_model_id"]) == (
        3,
        [{"model_id": a, "weight": 90}, {"model_id": b, "weight": 10}],
        None,
    )
    shadowed = api.update_deployment(name, shadow_model_id=c)  # the split stays
    assert (shadowed["version"], shadowed["targets"], shadowed["shadow_model_id"]) == (
        4,
        split["targets"],
        c,
    )
    unshadowed = api.update_deployment(name, shadow_model_id=None)  # None removes it
    assert (unshadowed["version"], unshadowed["shadow_model_id"]) == (5, None)
    back = api.rollback_deployment(name)
    assert (back["version"], back["targets"], back["shadow_model_id"]) == (
        6,
        split["targets"],
        c,
    )

    split_targets: Targets = {"targets": split["targets"], "shadow_model_id": None}
    with_shadow: Targets = {"targets": split["targets"], "shadow_model_id": c}
    history = list(api.deployment_history(name, page_size=2))  # three pages
    assert [(h["version"], h["action"], h["before"], h["after"]) for h in history] == [
        (6, "rolled_back", split_targets, with_shadow),
        (5, "updated", with_shadow, split_targets),
        (4, "updated", split_targets, with_shadow),
        (3, "updated", one(b), split_targets),
        (2, "updated", one(a), one(b)),
        (1, "created", None, one(a)),
    ]
    assert len({h["actor"] for h in history}) == 1 and history[0]["actor"] is not None

    api.delete_deployment(name)
    with pytest.raises(ApiError) as gone:
        api.get_deployment(name)
    assert (gone.value.status, gone.value.code) == (404, "not_found")
    assert name not in [d["name"] for d in api.list_deployments()]


def test_stats_count_the_target_and_the_shadow(api: BitserveClient, models: dict[str, str]) -> None:
    a, c = models["a"], models["c"]
    name = unique("figures")
    api.create_deployment(name, targets=[(a, 1)], shadow_model_id=c)
    requests = [[png(s), png(s + 1)] for s in (0, 2, 4)]  # 3 requests, 6 images
    target_firsts: Counter[str] = Counter()
    shadow_firsts: Counter[str] = Counter()
    agreed = 0
    for images in requests:
        answer = api.predict_deployment(name, images, top_k=1)
        assert answer["model_id"] == a  # the shadow's answers are never returned
        mine = [p["top_k"][0]["label"] for p in answer["predictions"]]
        theirs = [labels[0]["label"] for labels in api.predict(c, images, top_k=1)]
        target_firsts.update(mine)
        shadow_firsts.update(theirs)
        agreed += sum(x == y for x, y in zip(mine, theirs, strict=True))

    # The shadow answers after the response is sent: wait for its three requests to count.
    deadline = time.monotonic() + 20
    while True:
        stats: DeploymentStats = api.deployment_stats(name)
        roles = {m["role"]: m for m in stats["models"]}
        if roles.get("shadow", {}).get("requests") == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (stats["deployment"], stats["version"], [m["role"] for m in stats["models"]]) == (
        name,
        1,
        ["target", "shadow"],
    )
    target, shadow = roles["target"], roles["shadow"]
    figures = ("model_id", "weight", "requests", "errors", "images", "top1_labels", "agreement")
    assert {k: target[k] for k in figures} == {
        "model_id": a,
        "weight": 1,
        "requests": 3,
        "errors": 0,
        "images": 6,
        "top1_labels": dict(target_firsts),
        "agreement": None,
    }
    assert {k: shadow[k] for k in figures} == {
        "model_id": c,
        "weight": None,
        "requests": 3,
        "errors": 0,
        "images": 6,
        "top1_labels": dict(shadow_firsts),
        "agreement": {"compared": 6, "agreed": agreed},
    }
    for row in (target, shadow):
        latency = row["latency_ms"]
        assert latency is not None and latency["mean"] > 0
        assert latency["p50"] is not None and latency["p95"] is not None
        assert latency["p50"] <= latency["p95"]
    api.delete_deployment(name)


def test_bad_input_is_refused_here_or_with_the_servers_code(
    api: BitserveClient, models: dict[str, str]
) -> None:
    a, b = models["a"], models["b"]
    with pytest.raises(ValueError, match="exactly one of model_id and targets"):
        api.create_deployment("x", a, targets=[(b, 1)])
    with pytest.raises(ValueError, match="exactly one of model_id and targets"):
        api.create_deployment("x")
    with pytest.raises(TypeError, match=r"\(model_id, weight\)"):
        api.create_deployment("x", targets=[(a, 1, 2)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"weight: int"):
        api.create_deployment("x", targets=[(a, "90")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="model_id', 'weight'"):
        api.create_deployment("x", targets=[{"model_id": a, "share": 1}])
    with pytest.raises(ValueError, match="give model_id, targets or shadow_model_id"):
        api.update_deployment("x")
    with pytest.raises(ValueError, match="not both"):
        api.update_deployment("x", model_id=a, targets=[(b, 1)])
    with pytest.raises(TypeError, match="images must be a list"):
        api.predict_deployment("x", png(0))  # type: ignore[arg-type]

    name = unique("refused")
    api.create_deployment(name, a)
    with pytest.raises(ApiError) as exists:
        api.create_deployment(name, b)
    assert (exists.value.status, exists.value.code) == (409, "deployment_exists")
    with pytest.raises(ApiError) as first:
        api.rollback_deployment(name)
    assert (first.value.status, first.value.code) == (409, "nothing_to_roll_back")
    with pytest.raises(ApiError) as in_use:
        api.delete_model(a)
    assert (in_use.value.status, in_use.value.code) == (409, "model_in_use")
    assert name in in_use.value.details["deployments"]
    with pytest.raises(ApiError) as bad_name:
        api.create_deployment("Not A Label", a)
    assert (bad_name.value.status, bad_name.value.code) == (422, "invalid_request")
    with pytest.raises(ApiError) as unknown:
        api.update_deployment(name, model_id="mdl_nope")
    assert (unknown.value.status, unknown.value.code) == (404, "not_found")
    assert api.get_deployment(name)["version"] == 1  # nothing changed
    api.delete_deployment(name)
