"""What `bitserve deployments` prints, without a server: shares of a split, the details of a
deployment, figures the live tests cannot make (no requests yet, a latency past the last
bucket, a former target), and --split parsing. Against a live server:
tests/integration/test_cli_deployments.py."""

from __future__ import annotations

import io
import re
from typing import Any

import click
import pytest

from bitserve_client.cli import render_deployments as render
from bitserve_client.cli.deployments import parse_split
from bitserve_client.cli.remote import console_for, show


def text(renderable: Any) -> list[str]:
    out = io.StringIO()
    show(console_for(out), renderable)
    return out.getvalue().splitlines()


def target(model_id: str, weight: int) -> dict[str, Any]:
    return {"model_id": model_id, "weight": weight}


def test_targets_are_shown_as_shares_of_the_requests() -> None:
    assert render.targets_text([target("m1", 1)]) == "m1"
    assert render.targets_text([target("m1", 9), target("m2", 1)], "m3") == (
        "m1 90%, m2 10% + shadow m3"
    )
    assert render.targets_text([target("m1", 1), target("m2", 2)]) == "m1 33.3%, m2 66.7%"


def test_a_split_deployment_in_detail() -> None:
    deployment = {
        "name": "pets",
        "version": 4,
        "targets": [target("m1", 3), target("m2", 1)],
        "shadow_model_id": None,
        "created_at": "2026-12-02T08:30:00.123456Z",
        "updated_at": "2026-12-02T09:00:00Z",
    }
    assert [
        re.split(r"\s{2,}", line.strip()) for line in text(render.deployment_details(deployment))
    ] == [
        ["name", "pets"],
        ["version", "4"],
        ["target", "m1 (weight 3, 75% of the requests)"],
        ["m2 (weight 1, 25% of the requests)"],
        ["shadow", "none"],
        ["created", "2026-12-02 08:30:00Z"],
        ["updated", "2026-12-02 09:00:00Z"],
    ]
    assert render.deployment_line(deployment) == "deployment pets v4: m1 75%, m2 25%"


def figures(model_id: str, role: str, weight: int | None, **fields: Any) -> dict[str, Any]:
    base = {
        "model_id": model_id,
        "role": role,
        "weight": weight,
        "requests": 0,
        "errors": 0,
        "images": 0,
        "latency_ms": None,
        "top1_labels": {},
        "agreement": None,
    }
    return {**base, **fields}


def test_figures_of_a_former_target_a_slow_shadow_and_nothing_yet() -> None:
    stats = {
        "deployment": "pets",
        "version": 2,
        "models": [
            figures("m2", "target", 1),  # the target now, no request yet
            figures(
                "m1",
                "target",
                None,  # a former target
                requests=3,
                errors=1,
                images=2,
                latency_ms={"mean": 7.25, "p50": 5.0, "p95": 10.0},
                top1_labels={"ant": 1, "bee": 1},
            ),
            figures(
                "m3",
                "shadow",
                None,
                requests=2,
                images=2,
                latency_ms={"mean": 12000.0, "p50": None, "p95": None},
                top1_labels={"ant": 2},
                agreement={"compared": 0, "agreed": 0},
            ),
        ],
    }
    rows = [line.split("  ") for line in text(render.stats_table(stats))]
    cells = [[c.strip() for c in row if c.strip()] for row in rows]
    assert cells == [
        ["MODEL", "m2", "m1", "m3"],
        ["role", "target", "target", "shadow"],
        ["weight", "1", "-", "-"],
        ["requests", "0", "3", "2"],
        ["errors", "0", "1", "0"],
        ["images", "0", "2", "2"],
        ["latency mean", "-", "7.2 ms", "12000.0 ms"],
        ["latency p50", "-", "5.0 ms", "over 10 s"],
        ["latency p95", "-", "10.0 ms", "over 10 s"],
        ["top labels", "-", "ant 1 (50.0%), bee 1 (50.0%)", "ant 2 (100.0%)"],
        ["agreement", "-", "-", "- (0/0)"],
    ]
    empty = {"deployment": "pets", "version": 1, "models": []}
    assert render.stats_table(empty) == "deployment pets v1: no requests yet"


def test_split_values_are_model_equals_weight() -> None:
    assert parse_split(("mdl_a=90", "mdl_b=10")) == [("mdl_a", 90), ("mdl_b", 10)]
    for bad in ("mdl_a", "=5", "mdl_a=", "mdl_a=0", "mdl_a=-1", "mdl_a=1.5", "mdl_a=x"):
        with pytest.raises(click.BadParameter, match="expected MODEL=WEIGHT"):
            parse_split((bad,))
