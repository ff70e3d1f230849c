"""`bitserve deployments ...` as a user runs it: the `bitserve` entry point in a real subprocess
(tests/integration/cli_helpers.py `run_cli`) against the session's REAL uvicorn server on
PostgreSQL + Redis. Output is captured, so stdout is no terminal: tables come as plain lines,
their columns split by two spaces or more. Every answer is compared with what the API itself
answers (through bitserve_client). Usage errors, which never reach a server, run in-process.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bitserve_client import BitserveClient
from bitserve_client.cli import main
from tests.integration.cli_helpers import Cli, Run, run_cli
from tests.integration.conftest import LiveServer
from tests.integration.test_client_deployments import png, publish, unique

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

COLUMNS = re.compile(r"\s{2,}")


@pytest.fixture(scope="module")
def models(live_server_instance: LiveServer) -> dict[str, str]:
    return {name: publish(live_server_instance, 200 + i) for i, name in enumerate("abc")}


@pytest.fixture
def api(live_server_instance: LiveServer) -> Iterator[BitserveClient]:
    server = live_server_instance
    with BitserveClient(server.url, api_key=server.key, timeout=60) as client:
        yield client


@pytest.fixture
def run(live_server_instance: LiveServer, tmp_path: Path) -> Cli:
    server = live_server_instance

    def deployments(*args: str) -> Run:
        return run_cli(server.url, server.key, "deployments", *args, home=tmp_path)

    return deployments


def ok(done: Run) -> Run:
    assert (done.rc, done.err) == (0, ""), done
    return done


def rows(done: Run) -> list[list[str]]:
    return [COLUMNS.split(line.strip()) for line in done.lines]


def test_a_deployment_from_the_terminal(
    run: Cli, api: BitserveClient, models: dict[str, str], tmp_path: Path
) -> None:
    a, b, c = models["a"], models["b"], models["c"]
    name = unique("term")
    assert ok(run("create", name, "--model", a)).out == f"deployment {name} v1: {a}\n"
    again = run("create", name, "--model", b)
    assert again.rc == 1 and again.out == ""
    assert re.fullmatch(r"bitserve: deployment_exists: .*\n", again.err), again.err

    assert ok(run("show", name, "--json")).json() == api.get_deployment(name)
    shown = {r[0]: r[1] for r in rows(ok(run("show", name))) if len(r) == 2}  # field, value
    assert (shown["name"], shown["version"], shown["target"], shown["shadow"]) == (
        name,
        "1",
        f"{a} (all requests)",
        "none",
    )

    # Predictions: the same labels as the model's own route, and who answered.
    cat, dog = tmp_path / "cat.png", tmp_path / "dog.png"
    cat.write_bytes(png(1))
    dog.write_bytes(png(2))
    expected = api.predict(a, [cat, dog], top_k=2)
    answer = ok(run("predict", name, str(cat), str(dog), "--top-k", "2", "--json")).json()
    assert answer == {
        "deployment": name,
        "predictions": [{"model_id": a, "version": 1, "top_k": labels} for labels in expected],
    }
    table = rows(ok(run("predict", name, str(cat), str(dog), "--top-k", "2")))
    assert table == [
        ["FILE", "LABEL", "SCORE", "NEXT", "MODEL"],
        *(
            [
                str(path),
                labels[0]["label"],
                f"{labels[0]['score']:.4f}",
                f"{labels[1]['label']} {labels[1]['score']:.4f}",
                a,
            ]
            for path, labels in zip((cat, dog), expected, strict=True)
        ),
    ]

    split = ok(run("update", name, "--split", f"{a}=90", "--split", f"{b}=10", "--shadow", c))
    assert split.out == f"deployment {name} v2: {a} 90%, {b} 10% + shadow {c}\n"
    unshadowed = ok(run("update", name, "--no-shadow", "--json")).json()
    assert (unshadowed["version"], unshadowed["shadow_model_id"]) == (3, None)
    assert unshadowed["targets"] == [{"model_id": a, "weight": 90}, {"model_id": b, "weight": 10}]
    back = ok(run("rollback", name))
    assert back.out == f"deployment {name} v4: {a} 90%, {b} 10% + shadow {c}\n"

    history = ok(run("history", name, "--json")).json()
    assert history == list(api.deployment_history(name))
    assert [(h["version"], h["action"]) for h in history] == [
        (4, "rolled_back"),
        (3, "updated"),
        (2, "updated"),
        (1, "created"),
    ]
    lines = rows(ok(run("history", name)))
    assert lines[0] == ["VERSION", "ACTION", "AT", "BY", "FROM", "TO"]
    split_text = f"{a} 90%, {b} 10%"
    # [version, action, at, by, from, to] ("2026-01-02 03:04:05Z" has a single space)
    assert [[r[0], r[1], r[-2], r[-1]] for r in lines[1:]] == [
        ["4", "rolled_back", split_text, f"{split_text} + shadow {c}"],
        ["3", "updated", f"{split_text} + shadow {c}", split_text],
        ["2", "updated", a, f"{split_text} + shadow {c}"],
        ["1", "created", "-", a],
    ]
    assert {r[3] for r in lines[1:]} == {history[0]["actor"]}

    listed = ok(run("list", "--limit", "0", "--json")).json()
    assert api.get_deployment(name) in listed
    mine = [r for r in rows(ok(run("list", "--limit", "0"))) if r[0] == name]
    assert [r[1:4] for r in mine] == [["4", split_text, c]]

    assert ok(run("delete", name)).out == f"deleted deployment {name}\n"
    gone = run("show", name)
    assert gone.rc == 1 and re.fullmatch(r"bitserve: not_found: .*\n", gone.err), gone.err


def test_stats_show_each_model_side_by_side(
    run: Cli, api: BitserveClient, models: dict[str, str]
) -> None:
    a, c = models["a"], models["c"]
    name = unique("stats")
    ok(run("create", name, "--model", a, "--shadow", c))
    for seed in (0, 2):
        api.predict_deployment(name, [png(seed), png(seed + 1)])
    # The shadow answers after the response is sent: wait for its two requests to count.
    deadline = time.monotonic() + 20
    while (
        next(
            (m["requests"] for m in api.deployment_stats(name)["models"] if m["role"] == "shadow"),
            0,
        )
        < 2
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    stats = ok(run("stats", name, "--json")).json()
    assert stats == api.deployment_stats(name)  # no requests since: the same figures
    target, shadow = stats["models"]
    assert (target["model_id"], shadow["model_id"], shadow["requests"]) == (a, c, 2)

    def ms(value: float | None) -> str:
        return "over 10 s" if value is None else f"{value:.1f} ms"

    def labels(counts: dict[str, int]) -> str:
        total = sum(counts.values())
        return ", ".join(f"{k} {n} ({100 * n / total:.1f}%)" for k, n in list(counts.items())[:3])

    compared, agreed = shadow["agreement"]["compared"], shadow["agreement"]["agreed"]
    assert compared == 4
    lines = rows(ok(run("stats", name)))
    assert lines == [
        [f"deployment {name} v1"],
        [""],
        ["MODEL", a, c],
        ["role", "target", "shadow"],
        ["weight", "1", "-"],
        ["requests", "2", "2"],
        ["errors", "0", "0"],
        ["images", "4", "4"],
        *(
            [f"latency {key}", ms(target["latency_ms"][key]), ms(shadow["latency_ms"][key])]
            for key in ("mean", "p50", "p95")
        ),
        ["top labels", labels(target["top1_labels"]), labels(shadow["top1_labels"])],
        ["agreement", "-", f"{100 * agreed / compared:.1f}% ({agreed}/{compared})"],
    ]
    ok(run("delete", name))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "x"], "give --model MODEL or --split MODEL=WEIGHT"),
        (["create", "x", "--model", "m", "--split", "m=1"], "give --model or --split, not both"),
        (["create", "x", "--split", "m"], "expected MODEL=WEIGHT"),
        (["create", "x", "--split", "m=0"], "expected MODEL=WEIGHT"),
        (["update", "x"], "give --model, --split, --shadow or --no-shadow"),
        (["update", "x", "--shadow", "m", "--no-shadow"], "give --shadow or --no-shadow"),
    ],
)
def test_usage_errors_exit_2_before_any_request(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # An address nothing listens on: a request would fail with exit status 1, not 2.
    assert main(["deployments", *args, "--url", "http://127.0.0.1:9"]) == 2
    assert message in capsys.readouterr().err
