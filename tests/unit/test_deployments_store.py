"""Deployments on SQLite and PostgreSQL (service.deployments, service.deployment_stats,
service.deployment_routing): versions and history, rollback, refusals, a model in use, figures
added up over flushes, exact weighted round-robin, and a gateway's view of a change (kept
until the new models are loaded, refreshed within the bound)."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from pathlib import Path

import pytest

from service import deployment_stats, deployments, models_store
from service.db import Database
from service.deployment_routing import DeploymentRoutes, Resolved, Route, read_deployment
from service.deployment_stats import LATENCY_BOUNDS_MS, DeploymentStats, percentile_ms
from service.deployments import Targets
from service.domain_errors import Conflict, InvalidRequest, NotFound
from service.settings import Settings
from service.storage import Storage
from service.tables import Model
from tests.unit.job_helpers import add_model

TENANT = "team"


def one(model_id: str) -> Targets:
    return Targets(((model_id, 1),))


def test_versions_history_and_rollback(db: Database) -> None:
    a, b, c = add_model(db, TENANT), add_model(db, TENANT), add_model(db, TENANT)
    with db.sessionmaker() as session:
        made = deployments.create_deployment(session, TENANT, "pets", one(a), "key_1")
        assert made.version == 1
        changed = deployments.update_deployment(session, TENANT, "pets", one(b), "key_2")
        assert changed.version == 2
        same = deployments.update_deployment(session, TENANT, "pets", one(b), "key_2")
        assert same.version == 2  # no change, no version
        split = Targets(((b, 3), (c, 1)), shadow=a)
        assert deployments.update_deployment(session, TENANT, "pets", split, "key_3").version == 3
        back, version = deployments.previous_targets(session, TENANT, "pets")
        assert (back, version) == (one(b), 3)
        rolled = deployments.update_deployment(
            session, TENANT, "pets", back, "key_3", action=deployments.ROLLED_BACK
        )
        assert rolled.version == 4
        assert deployments.targets_of(session, made.id) == one(b)
        changes = session.scalars(
            deployments.history(session, made).order_by(deployments.DeploymentChange.version)
        ).all()
    assert [(c.version, c.action, c.actor) for c in changes] == [
        (1, "created", "key_1"),
        (2, "updated", "key_2"),
        (3, "updated", "key_3"),
        (4, "rolled_back", "key_3"),
    ]
    assert changes[0].before is None
    assert changes[2].after == split.as_dict()
    assert changes[3].before == split.as_dict() and changes[3].after == one(b).as_dict()


def test_refusals(db: Database) -> None:
    a, b = add_model(db, TENANT), add_model(db, TENANT)
    other_classes = add_model(db, TENANT, ("eel", "fox"))
    theirs = add_model(db, tenant="others")
    with db.sessionmaker() as session:
        deployments.create_deployment(session, TENANT, "pets", one(a), None)
        with pytest.raises(Conflict) as taken:
            deployments.create_deployment(session, TENANT, "pets", one(b), None)
        assert taken.value.code == "deployment_exists"
        with pytest.raises(Conflict) as never_changed:
            deployments.previous_targets(session, TENANT, "pets")
        assert never_changed.value.code == "nothing_to_roll_back"
        with pytest.raises(InvalidRequest) as differ:
            deployments.create_deployment(
                session, TENANT, "mixed", Targets(((a, 1), (other_classes, 1))), None
            )
        assert (differ.value.code, differ.value.details["differing"]) == (
            "classes_differ",
            [other_classes],
        )
        with pytest.raises(InvalidRequest):
            deployments.create_deployment(session, TENANT, "twice", Targets(((a, 1), (a, 2))), None)
        with pytest.raises(InvalidRequest):
            deployments.create_deployment(session, TENANT, "self", Targets(((a, 1),), a), None)
        with pytest.raises(NotFound):  # another tenant's model is not there
            deployments.create_deployment(session, TENANT, "stolen", one(theirs), None)
        with pytest.raises(Conflict) as moved:
            deployments.update_deployment(session, TENANT, "pets", one(b), None, expected_version=7)
        assert (moved.value.code, moved.value.details) == ("version_changed", {"version": 1})
        session.rollback()
        # The same name is another tenant's to use.
        deployments.create_deployment(session, "others", "pets", one(theirs), None)
        with pytest.raises(NotFound):
            deployments.get_deployment(session, "nobody", "pets")


def test_a_model_in_use_is_not_deleted(db: Database, tmp_path: Path) -> None:
    storage = Storage.from_settings(Settings(home=tmp_path))
    target, shadow = add_model(db, TENANT), add_model(db, TENANT)
    with db.sessionmaker() as session:
        deployments.create_deployment(
            session, TENANT, "pets", Targets(((target, 1),), shadow), None
        )
        deployments.create_deployment(session, TENANT, "cats", one(target), None)
    for model_id, names in ((target, ["cats", "pets"]), (shadow, ["pets"])):
        with db.sessionmaker() as session, pytest.raises(Conflict) as refused:
            models_store.delete_model(session, storage, TENANT, model_id)
        assert (refused.value.code, refused.value.details) == (
            "model_in_use",
            {"deployments": names},
        )
    with db.sessionmaker() as session:
        deployments.delete_deployment(session, TENANT, "pets")
        deployments.delete_deployment(session, TENANT, "cats")
        models_store.delete_model(session, storage, TENANT, target)
        assert session.get(Model, target) is None


def test_figures_add_up_over_flushes(db: Database) -> None:
    a, shadow = add_model(db, TENANT), add_model(db, TENANT)
    with db.sessionmaker() as session:
        row = deployments.create_deployment(session, TENANT, "pets", one(a), None)
    stats = DeploymentStats()
    stats.record(row.id, a, "target", latency_ms=3.0, labels=["cat", "dog"])
    stats.record(row.id, a, "target", latency_ms=40.0, labels=["cat"])
    stats.record(row.id, shadow, "shadow", latency_ms=7.0, labels=["dog", "dog"], agreed=1)
    assert stats.flush(db) == 2
    assert stats.flush(db) == 0  # nothing new
    stats.record(row.id, a, "target", latency_ms=20000.0, error=True)
    assert stats.flush(db) == 1
    with db.sessionmaker() as session:
        rows = {r.role: r for r in deployment_stats.read(session, row.id)}
    target = deployment_stats.summary(rows["target"])
    assert (target["requests"], target["errors"], target["images"]) == (3, 1, 3)
    assert target["top1_labels"] == {"cat": 2, "dog": 1}
    assert target["latency_ms"] == {
        "mean": pytest.approx((3 + 40 + 20000) / 3),
        "p50": 50.0,
        "p95": None,
    }
    assert target["agreement"] is None
    shadowed = deployment_stats.summary(rows["shadow"])
    assert shadowed["agreement"] == {"compared": 2, "agreed": 1}
    assert shadowed["top1_labels"] == {"dog": 2}
    # Deleting the deployment deletes its figures; a late flush of them writes nothing.
    stats.record(row.id, a, "target", latency_ms=1.0, labels=["cat"])
    with db.sessionmaker() as session:
        deployments.delete_deployment(session, TENANT, "pets")
    stats.flush(db)
    with db.sessionmaker() as session:
        assert deployment_stats.read(session, row.id) == []


def test_percentiles_are_bucket_bounds() -> None:
    buckets = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    buckets[0], buckets[3], buckets[-1] = 50, 45, 5
    assert percentile_ms(buckets, 0.5) == 5.0
    assert percentile_ms(buckets, 0.95) == 50.0
    assert percentile_ms(buckets, 0.99) is None  # above the last bound
    assert percentile_ms([0] * len(buckets), 0.5) is None


@pytest.mark.parametrize(
    ("weights", "window"),
    [((90, 10), 100), ((2, 1, 1), 4), ((1, 1), 2), ((3, 7), 10)],
)
def test_weighted_round_robin_is_exact_in_every_window(
    weights: tuple[int, ...], window: int
) -> None:
    split = tuple((f"m{i}", w) for i, w in enumerate(weights))
    route = Route(Resolved("dep_x", "pets", 1, Targets(split)), checked_at=0.0)
    picks = [route.pick()[0] for _ in range(window * 5)]
    for start in range(0, len(picks), window):
        assert Counter(picks[start : start + window]) == {f"m{i}": w for i, w in enumerate(weights)}
    if weights == (90, 10):  # the canary spread out, not in a burst
        canary = [i for i, m in enumerate(picks[:100]) if m == "m1"]
        assert max(b - a for a, b in itertools.pairwise(canary)) == 10


def test_a_gateway_keeps_the_old_version_until_the_new_models_are_loaded(db: Database) -> None:
    a, b = add_model(db, TENANT), add_model(db, TENANT)
    with db.sessionmaker() as session:
        deployments.create_deployment(session, TENANT, "pets", one(a), None)

    async def scenario() -> list[object]:
        loaded: list[str] = []
        release = asyncio.Event()

        async def load(model_id: str) -> None:
            if model_id == b:
                await release.wait()  # a slow load of the new model
            loaded.append(model_id)

        routes = DeploymentRoutes(
            lambda tenant, name: read_deployment(db, tenant, name), load, refresh_seconds=0.0
        )
        seen: list[object] = [(await routes.resolve(TENANT, "pets")).pick()[0]]
        with db.sessionmaker() as session:
            deployments.update_deployment(session, TENANT, "pets", one(b), None)
        # Refreshed (bound 0 s): version 2 seen, its model loading: version 1 still answers.
        seen.append((await routes.resolve(TENANT, "pets")).pick()[0])
        seen.append((await routes.resolve(TENANT, "pets")).pick()[0])
        release.set()
        for _ in range(50):
            await asyncio.sleep(0.01)
            route = await routes.resolve(TENANT, "pets")
            if route.version == 2:
                break
        seen.append(route.pick()[0])
        seen.append(loaded)
        with db.sessionmaker() as session:
            deployments.delete_deployment(session, TENANT, "pets")
        try:
            await routes.resolve(TENANT, "pets")
        except NotFound:
            seen.append("gone")
        await routes.close()
        return seen

    assert asyncio.run(scenario()) == [a, a, a, b, [a, b], "gone"]


def test_a_gateway_reads_again_only_after_the_bound(db: Database) -> None:
    a, b = add_model(db, TENANT), add_model(db, TENANT)
    with db.sessionmaker() as session:
        deployments.create_deployment(session, TENANT, "pets", one(a), None)

    async def scenario() -> tuple[str, str]:
        reads = Counter[str]()

        async def fetch(tenant: str | None, name: str) -> Resolved | None:
            reads[name] += 1
            return await read_deployment(db, tenant, name)

        async def load(model_id: str) -> None:
            return None

        routes = DeploymentRoutes(fetch, load, refresh_seconds=0.3)
        first = (await routes.resolve(TENANT, "pets")).pick()[0]
        with db.sessionmaker() as session:
            deployments.update_deployment(session, TENANT, "pets", one(b), None)
        for _ in range(5):
            assert (await routes.resolve(TENANT, "pets")).pick()[0] == a  # within the bound
        assert reads["pets"] == 1
        await asyncio.sleep(0.35)
        await routes.resolve(TENANT, "pets")  # reads version 2, loads b in the background
        await asyncio.sleep(0.05)
        after = (await routes.resolve(TENANT, "pets")).pick()[0]
        assert reads["pets"] == 2
        await routes.close()
        return first, after

    assert asyncio.run(scenario()) == (a, b)
