"""Deployments over real HTTP (issue 16): a stable name answers with the model it points at;
promote and roll back while requests keep coming (none fails); a 90/10 split measured over
many requests; a shadow's answers recorded and never returned; a model in use cannot be
deleted; the history is complete; names are per tenant; and a second API process (a real
`bitserve api`) follows a change within the stated bound."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from bitcore.models import create_model
from service.api_keys import Scope
from tests.chaos.resilience_fixtures import ApiProcess
from tests.imagegen import class_image, encode
from tests.integration.conftest import LiveServer, make_key, make_settings
from tests.model_fixtures import publish_model
from tests.services import _free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CLASSES = ["ant", "bee", "cow"]
REFRESH_SECONDS = 1.0


def png(seed: int) -> bytes:
    return encode(class_image(seed % 3, 3, (40, 48), seed=seed), "PNG")


def _publish(
    server: LiveServer, seed: int, classes: list[str] = CLASSES, tenant: str = "default"
) -> str:
    torch.manual_seed(seed)
    model = create_model("tiny-R10x0.25", len(classes))
    state = server.app.state
    model_id, _ = publish_model(
        state.db, state.storage, model, "tiny-R10x0.25", classes, 32, tenant_id=tenant
    )
    return model_id


@pytest.fixture(scope="module")
def server(
    migrated_db: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("deployments"),
        migrated_db,
        redis_url,
        deployment_refresh_seconds=REFRESH_SECONDS,
        deployment_stats_flush_seconds=0.5,
        predict_rate_per_second=10_000.0,  # hundreds of requests per test, from one key
    )
    live = LiveServer(settings).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def models(server: LiveServer) -> dict[str, str]:
    return {name: _publish(server, seed) for seed, name in enumerate(["a", "b", "c"])}


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as client:
        yield client


def _name(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns() % 10**9}"


def _predict(http: httpx.Client, path: str, seed: int = 1) -> httpx.Response:
    return http.post(path, files=[("files", ("a.png", png(seed), "image/png"))])


def test_a_name_answers_with_its_model_and_every_change_is_in_the_history(
    server: LiveServer, models: dict[str, str], http: httpx.Client
) -> None:
    name = _name("pets")
    created = http.post("/v1/deployments", json={"name": name, "model_id": models["a"]})
    assert created.status_code == 201, created.text
    assert created.headers["location"] == f"/v1/deployments/{name}"
    body = created.json()
    assert (body["name"], body["version"], body["shadow_model_id"]) == (name, 1, None)
    assert body["targets"] == [{"model_id": models["a"], "weight": 1}]

    # The same answer as the model's own route, plus who answered.
    direct = _predict(http, f"/v1/models/{models['a']}/predict").json()
    through = _predict(http, f"/v1/deployments/{name}/predict").json()
    assert (through["deployment"], through["version"], through["model_id"]) == (
        name,
        1,
        models["a"],
    )
    assert through["predictions"] == direct["predictions"]

    promoted = http.patch(f"/v1/deployments/{name}", json={"model_id": models["b"]})
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["version"] == 2
    answer = _predict(http, f"/v1/deployments/{name}/predict").json()
    assert (answer["model_id"], answer["version"]) == (models["b"], 2)
    assert (
        answer["predictions"]
        == _predict(http, f"/v1/models/{models['b']}/predict").json()["predictions"]
    )

    same = http.patch(f"/v1/deployments/{name}", json={"model_id": models["b"]})
    assert same.json()["version"] == 2  # no change, no new version

    back = http.post(f"/v1/deployments/{name}/rollback")
    assert back.status_code == 200, back.text
    assert (back.json()["version"], back.json()["targets"]) == (
        3,
        [{"model_id": models["a"], "weight": 1}],
    )
    assert _predict(http, f"/v1/deployments/{name}/predict").json()["model_id"] == models["a"]

    history = http.get(f"/v1/deployments/{name}/history").json()["items"]
    key_id = f"key_{server.key[4:24]}"
    one = lambda m: {"targets": [{"model_id": m, "weight": 1}], "shadow_model_id": None}  # noqa: E731
    assert [(h["version"], h["action"], h["before"], h["after"]) for h in history] == [
        (3, "rolled_back", one(models["b"]), one(models["a"])),
        (2, "updated", one(models["a"]), one(models["b"])),
        (1, "created", None, one(models["a"])),
    ]
    assert {h["actor"] for h in history} == {key_id}
    assert [h["at"] for h in history] == sorted((h["at"] for h in history), reverse=True)

    listed = [d["name"] for d in http.get("/v1/deployments", params={"limit": 100}).json()["items"]]
    assert name in listed
    assert http.delete(f"/v1/deployments/{name}").status_code == 204
    gone = _predict(http, f"/v1/deployments/{name}/predict")
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "not_found")


def test_bad_requests_are_refused_clearly(
    server: LiveServer, models: dict[str, str], http: httpx.Client
) -> None:
    other_classes = _publish(server, 7, ["dog", "elk", "fox"])
    name = _name("clear")
    assert (
        http.post("/v1/deployments", json={"name": name, "model_id": models["a"]}).status_code
        == 201
    )
    cases = {
        "upper case": ({"name": "Pets", "model_id": models["a"]}, 422, "invalid_request"),
        "underscore": ({"name": "my_pets", "model_id": models["a"]}, 422, "invalid_request"),
        "both forms": (
            {
                "name": "x1",
                "model_id": models["a"],
                "targets": [{"model_id": models["b"], "weight": 1}],
            },
            422,
            "invalid_request",
        ),
        "zero weight": (
            {"name": "x2", "targets": [{"model_id": models["a"], "weight": 0}]},
            422,
            "invalid_request",
        ),
        "same model twice": (
            {"name": "x3", "targets": [{"model_id": models["a"], "weight": 1}] * 2},
            422,
            "invalid_request",
        ),
        "unknown model": ({"name": "x4", "model_id": "mdl_" + "a" * 20}, 404, "not_found"),
        "classes differ": (
            {"name": "x5", "model_id": models["a"], "shadow_model_id": other_classes},
            422,
            "classes_differ",
        ),
        "taken": ({"name": name, "model_id": models["b"]}, 409, "deployment_exists"),
    }
    answers = {
        case: http.post("/v1/deployments", json=body) for case, (body, _, _) in cases.items()
    }
    seen = {case: (a.status_code, a.json()["error"]["code"]) for case, a in answers.items()}
    assert seen == {case: (status, code) for case, (_, status, code) in cases.items()}
    assert answers["classes differ"].json()["error"]["details"]["differing"] == [other_classes]

    never_changed = http.post(f"/v1/deployments/{name}/rollback")
    assert (never_changed.status_code, never_changed.json()["error"]["code"]) == (
        409,
        "nothing_to_roll_back",
    )
    nothing = http.patch(f"/v1/deployments/{name}", json={})
    assert nothing.status_code == 422
    http.delete(f"/v1/deployments/{name}")


def test_a_model_in_use_cannot_be_deleted(server: LiveServer, http: httpx.Client) -> None:
    target, shadow = _publish(server, 11), _publish(server, 12)
    name = _name("keep")
    body = {"name": name, "model_id": target, "shadow_model_id": shadow}
    assert http.post("/v1/deployments", json=body).status_code == 201
    for model_id in (target, shadow):
        refused = http.delete(f"/v1/models/{model_id}")
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert (error["code"], error["details"]) == ("model_in_use", {"deployments": [name]})
        assert name in error["message"]
        assert http.get(f"/v1/models/{model_id}").status_code == 200
    assert http.delete(f"/v1/deployments/{name}").status_code == 204
    assert http.delete(f"/v1/models/{target}").status_code == 204


def test_promote_and_roll_back_under_load_without_a_failed_request(
    server: LiveServer, models: dict[str, str], http: httpx.Client
) -> None:
    name = _name("busy")
    assert (
        http.post("/v1/deployments", json={"name": name, "model_id": models["a"]}).status_code
        == 201
    )
    stop = threading.Event()
    answers: list[tuple[int, str | None]] = []

    def client(seed: int) -> None:
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as own:
            while not stop.is_set():
                answer = _predict(own, f"/v1/deployments/{name}/predict", seed)
                answers.append((answer.status_code, answer.json().get("model_id")))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        changes = [
            http.patch(f"/v1/deployments/{name}", json={"model_id": models["b"]}),
            http.post(f"/v1/deployments/{name}/rollback"),
            http.patch(
                f"/v1/deployments/{name}",
                json={
                    "targets": [
                        {"model_id": models["a"], "weight": 1},
                        {"model_id": models["c"], "weight": 1},
                    ]
                },
            ),
            http.patch(f"/v1/deployments/{name}", json={"model_id": models["c"]}),
        ]
        for change in changes:
            assert change.status_code == 200, change.text
            time.sleep(0.3)
        settled = len(answers)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    statuses = Counter(status for status, _ in answers)
    assert statuses == {200: len(answers)}, statuses
    assert len(answers) > 40
    assert {m for _, m in answers} <= {models["a"], models["b"], models["c"]}
    # After the last change (made through this process): only the new target answers.
    assert {m for _, m in answers[settled + 4 :]} == {models["c"]}
    http.delete(f"/v1/deployments/{name}")


def test_a_change_is_loaded_before_it_is_committed(
    server: LiveServer, models: dict[str, str], http: httpx.Client
) -> None:
    name = _name("warm")
    assert (
        http.post("/v1/deployments", json={"name": name, "model_id": models["a"]}).status_code
        == 201
    )
    cache = server.app.state.models
    cache.evict(models["c"])
    assert models["c"] not in cache.loaded
    changed = http.patch(f"/v1/deployments/{name}", json={"model_id": models["c"]})
    assert changed.status_code == 200
    # Loaded (and checked) before the answer: the first request through the name waits for no load.
    assert models["c"] in cache.loaded
    http.delete(f"/v1/deployments/{name}")


def test_a_90_10_split_is_exact_over_each_100_requests(
    server: LiveServer, models: dict[str, str], http: httpx.Client
) -> None:
    name = _name("canary")
    targets = [{"model_id": models["a"], "weight": 90}, {"model_id": models["b"], "weight": 10}]
    assert http.post("/v1/deployments", json={"name": name, "targets": targets}).status_code == 201
    seen = [
        _predict(http, f"/v1/deployments/{name}/predict", i).json()["model_id"] for i in range(300)
    ]
    # Smooth weighted round-robin in one process: each run of 100 requests splits exactly
    # 90/10 (stated tolerance: 0 per 100 requests per gateway), the canary's spread out.
    for start in range(0, 300, 100):
        window = Counter(seen[start : start + 100])
        assert window == {models["a"]: 90, models["b"]: 10}
    canary_at = [i for i, m in enumerate(seen[:100]) if m == models["b"]]
    assert max(b - a for a, b in itertools.pairwise(canary_at)) <= 11

    stats = http.get(f"/v1/deployments/{name}/stats").json()
    figures = {m["model_id"]: m for m in stats["models"]}
    assert (figures[models["a"]]["requests"], figures[models["a"]]["weight"]) == (270, 90)
    assert (figures[models["b"]]["requests"], figures[models["b"]]["weight"]) == (30, 10)
    assert figures[models["a"]]["images"] == 270 and figures[models["a"]]["errors"] == 0
    assert sum(figures[models["a"]]["top1_labels"].values()) == 270
    latency = figures[models["a"]]["latency_ms"]
    assert latency["mean"] > 0 and latency["p50"] is not None and latency["p50"] <= latency["p95"]
    # The same counts in the gateway's Prometheus metrics.
    text = http.get("/metrics").text
    for model, count in ((models["a"], 270), (models["b"], 30)):
        labels = f'deployment="{name}",model="{model}",outcome="ok",role="target",tenant="default"'
        assert f"bitserve_deployment_requests_total{{{labels}}} {count}.0" in text
    http.delete(f"/v1/deployments/{name}")


def test_a_shadow_is_recorded_and_never_returned(
    server: LiveServer, models: dict[str, str], http: httpx.Client
) -> None:
    name = _name("shadowed")
    body = {"name": name, "model_id": models["a"], "shadow_model_id": models["c"]}
    assert http.post("/v1/deployments", json=body).status_code == 201
    expected_shadow: Counter[str] = Counter()
    agreed = 0
    for seed in range(20):
        answer = _predict(http, f"/v1/deployments/{name}/predict", seed).json()
        assert answer["model_id"] == models["a"]
        assert (
            answer["predictions"]
            == _predict(http, f"/v1/models/{models['a']}/predict", seed).json()["predictions"]
        )
        shadow_first = _predict(http, f"/v1/models/{models['c']}/predict", seed).json()[
            "predictions"
        ][0]["top_k"][0]["label"]
        expected_shadow[shadow_first] += 1
        agreed += shadow_first == answer["predictions"][0]["top_k"][0]["label"]

    deadline = time.monotonic() + 20
    while True:
        stats = http.get(f"/v1/deployments/{name}/stats").json()
        shadow = next((m for m in stats["models"] if m["role"] == "shadow"), None)
        if (shadow and shadow["requests"] == 20) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert shadow is not None, stats
    assert (shadow["model_id"], shadow["requests"], shadow["errors"], shadow["weight"]) == (
        models["c"],
        20,
        0,
        None,
    )
    assert shadow["agreement"] == {"compared": 20, "agreed": agreed}
    assert shadow["top1_labels"] == dict(expected_shadow)
    target = next(m for m in stats["models"] if m["role"] == "target")
    assert (target["model_id"], target["requests"], target["agreement"]) == (models["a"], 20, None)
    http.delete(f"/v1/deployments/{name}")


def test_names_belong_to_their_tenant(
    server: LiveServer, models: dict[str, str], http: httpx.Client
) -> None:
    state = server.app.state
    name = _name("shared")
    assert (
        http.post("/v1/deployments", json={"name": name, "model_id": models["a"]}).status_code
        == 201
    )
    other_key = make_key(
        state.db, server.settings, tenant="other-team", scopes=(Scope.TRAIN, Scope.PREDICT)
    )
    theirs = _publish(server, 21, tenant="other-team")
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {other_key}"}, timeout=60
    ) as other:
        assert other.get(f"/v1/deployments/{name}").status_code == 404
        assert _predict(other, f"/v1/deployments/{name}/predict").status_code == 404
        assert name not in [d["name"] for d in other.get("/v1/deployments").json()["items"]]
        # Another tenant's model cannot be named, and the same name is theirs to use.
        stolen = other.post("/v1/deployments", json={"name": "x9", "model_id": models["a"]})
        assert (stolen.status_code, stolen.json()["error"]["code"]) == (404, "not_found")
        own = other.post("/v1/deployments", json={"name": name, "model_id": theirs})
        assert own.status_code == 201, own.text
        assert _predict(other, f"/v1/deployments/{name}/predict").json()["model_id"] == theirs
        assert (
            other.patch(f"/v1/deployments/{name}", json={"model_id": models["b"]}).status_code
            == 404
        )
        assert other.delete(f"/v1/deployments/{name}").status_code == 204
    assert _predict(http, f"/v1/deployments/{name}/predict").json()["model_id"] == models["a"]
    http.delete(f"/v1/deployments/{name}")


def test_a_second_api_process_follows_a_change_within_the_bound(
    server: LiveServer, models: dict[str, str], http: httpx.Client, tmp_path: Path
) -> None:
    name = _name("replicas")
    assert (
        http.post("/v1/deployments", json={"name": name, "model_id": models["a"]}).status_code
        == 201
    )
    api = ApiProcess(server.settings, _free_port(), tmp_path / "api.log").start()
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{api.port}", headers=server.headers, timeout=60
        ) as second:
            assert (
                _predict(second, f"/v1/deployments/{name}/predict").json()["model_id"]
                == models["a"]
            )
            # The new target already warm there, so what is measured is the pointer's delay.
            assert _predict(second, f"/v1/models/{models['b']}/predict").status_code == 200
            changed = http.patch(f"/v1/deployments/{name}", json={"model_id": models["b"]})
            assert changed.status_code == 200
            at = time.monotonic()
            while True:
                answer = _predict(second, f"/v1/deployments/{name}/predict")
                assert answer.status_code == 200, answer.text
                if answer.json()["model_id"] == models["b"]:
                    break
                assert time.monotonic() - at < REFRESH_SECONDS + 2.0, (
                    "the second process never followed"
                )
                time.sleep(0.05)
            followed = time.monotonic() - at
            # A model the second process has never loaded: it keeps answering with the old one
            # while it loads the new one, then switches; no request fails meanwhile.
            assert (
                http.patch(f"/v1/deployments/{name}", json={"model_id": models["c"]}).status_code
                == 200
            )
            seen = []
            while not seen or seen[-1] != models["c"]:
                answer = _predict(second, f"/v1/deployments/{name}/predict")
                assert answer.status_code == 200, answer.text
                seen.append(answer.json()["model_id"])
                assert time.monotonic() - at < 60, seen
            assert set(seen) <= {models["b"], models["c"]}
    finally:
        api.terminate()
        api.wait(30)
    print(f"second process followed after {followed:.2f} s (bound {REFRESH_SECONDS} s)")
    assert followed <= REFRESH_SECONDS + 1.0  # the bound, plus a loaded machine's slack
    http.delete(f"/v1/deployments/{name}")
