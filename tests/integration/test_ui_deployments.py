"""The page's Deployments section in a real browser (Chromium through Playwright) against a
live server: create a deployment, split it 90/10 between two models, give it a shadow, send
predictions through its name (httpx, as a client would), refresh the figures and read them
off the page (each model's column equal to GET .../stats), roll back, read the history (equal
to GET .../history), delete it. No console error or uncaught exception (the real
Content-Security-Policy included); screenshots go to a folder the test prints.

test_ui_views.py runs the section's pure parts in node; test_deployments.py tests the API itself.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from playwright.sync_api import Browser, Page, expect

from bitcore.models import create_model
from tests.imagegen import class_image, encode
from tests.integration.conftest import LiveServer, make_settings
from tests.integration.test_ui_browser import PageErrors, browser  # noqa: F401 (a fixture)
from tests.integration.ui_helpers import _to_fixed
from tests.model_fixtures import publish_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CLASSES = ["ant", "bee", "cow"]
PREDICTIONS = 20
FIGURES = "#deployment-stats table.deployment-figures"


@pytest.fixture(scope="module")
def server(
    migrated_db: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("ui-deployments"),
        migrated_db,
        redis_url,
        deployment_stats_flush_seconds=0.5,
        predict_rate_per_second=10_000.0,
    )
    live = LiveServer(settings).start()
    yield live
    live.stop()


def _publish(server: LiveServer, seed: int) -> str:
    torch.manual_seed(seed)
    model = create_model("tiny-R10x0.25", len(CLASSES))
    state = server.app.state
    model_id, _ = publish_model(state.db, state.storage, model, "tiny-R10x0.25", CLASSES, 32)
    return model_id


def _png(seed: int) -> bytes:
    return encode(class_image(seed % 3, 3, (40, 48), seed=seed), "PNG")


def _share(part: int, total: int) -> str:
    """deploymentShare in deployments.js: a per cent with at most one decimal."""
    value = float(_to_fixed(100 * part / total, 1))
    return f"{value:g}%"


def _split(targets: list[dict[str, Any]]) -> str:
    if len(targets) == 1:
        return str(targets[0]["model_id"])
    total = sum(t["weight"] for t in targets)
    return ", ".join(
        f"{t['model_id']} {t['weight']} ({_share(t['weight'], total)})" for t in targets
    )


def _served(snapshot: dict[str, Any] | None) -> str:
    if snapshot is None:
        return "–"
    shadow = f"; shadow {snapshot['shadow_model_id']}" if snapshot["shadow_model_id"] else ""
    return _split(snapshot["targets"]) + shadow


def _bound(ms: float | None) -> str:
    return "> 10 s" if ms is None else f"≤ {ms:g} ms"


def _expected_figures(stats: dict[str, Any]) -> dict[str, Any]:
    """What the figures table should show for GET .../stats: header, rows, top-label bars."""
    models = stats["models"]
    weights = sum(m["weight"] or 0 for m in models)

    def latency(m: dict[str, Any], what: str) -> str:
        lat = m["latency_ms"]
        if lat is None:
            return "–"
        return f"{_to_fixed(lat['mean'], 1)} ms" if what == "mean" else _bound(lat[what])

    def agreement(m: dict[str, Any]) -> str:
        a = m["agreement"]
        if not a or not a["compared"]:
            return "–"
        pct = _to_fixed(100 * a["agreed"] / a["compared"], 1)
        return f"{pct}% ({a['agreed']} of {a['compared']} images)"

    def weight(m: dict[str, Any]) -> str:
        return "–" if m["weight"] is None else f"{m['weight']} ({_share(m['weight'], weights)})"

    rows = [
        ["Role", *(m["role"] for m in models)],
        ["Weight", *map(weight, models)],
        ["Requests", *(str(m["requests"]) for m in models)],
        ["Errors", *(str(m["errors"]) for m in models)],
        ["Images", *(str(m["images"]) for m in models)],
        ["Mean latency", *(latency(m, "mean") for m in models)],
        ["p50 latency", *(latency(m, "p50") for m in models)],
        ["p95 latency", *(latency(m, "p95") for m in models)],
        ["Shadow agreement", *map(agreement, models)],
    ]
    labels = []
    for m in models:
        total = sum(m["top1_labels"].values())
        ranked = sorted(m["top1_labels"].items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        labels.append([[label, count, count / total] for label, count in ranked])
    return {
        "caption": f"Figures of {stats['deployment']} (version {stats['version']}), per model",
        "head": ["", *(m["model_id"] for m in models)],
        "rows": rows,
        "labels": labels,
    }


def _figures_on_the_page(page: Page) -> dict[str, Any]:
    return page.eval_on_selector(
        FIGURES,
        """t => {
          const rows = [...t.tBodies[0].rows];
          const last = rows.pop();
          return {
            caption: t.caption.textContent,
            head: [...t.tHead.rows[0].cells].map(c => c.textContent),
            rows: rows.map(r => [...r.cells].map(c => c.textContent)),
            labelsHeader: last.cells[0].textContent,
            labels: [...last.querySelectorAll("td")].map(td =>
              [...td.querySelectorAll("li")].map(li => [
                li.querySelector(".label").textContent,
                Number(li.querySelector(".bar-value").textContent),
                parseFloat(li.querySelector(".bar-fill").style.width) / 100,
              ])),
            barWidths: [...t.querySelectorAll(".bar-fill")].map(b => b.offsetWidth),
          };
        }""",
    )


def _history_on_the_page(page: Page) -> list[list[str]]:
    return page.eval_on_selector(
        "#deployment-history",
        """t => [...t.tBodies[0].rows].map(r => [...r.cells].map((c, i) =>
             i === 3 ? c.querySelector("time").getAttribute("datetime") : c.textContent))""",
    )


def _settle_stats(http: httpx.Client, name: str, shadow: str, images: int) -> dict[str, Any]:
    """GET .../stats until the shadow's copies (answered after each response) are all in."""
    deadline = time.monotonic() + 30
    while True:
        stats = http.get(f"/v1/deployments/{name}/stats").json()
        done = [m for m in stats["models"] if m["model_id"] == shadow and m["role"] == "shadow"]
        if done and done[0]["images"] == images:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)


def test_a_deployment_is_made_split_measured_rolled_back_and_deleted_on_the_page(
    server: LiveServer,
    browser: Browser,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
) -> None:
    a, b, c = (_publish(server, seed) for seed in (1, 2, 3))
    name = f"pets-{time.monotonic_ns() % 10**9}"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"screenshots: {shots}")
    key_id = f"key_{server.key[4:24]}"

    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    errors = PageErrors(page)
    page.set_default_timeout(60_000)
    page.on("dialog", lambda dialog: dialog.accept())  # "Delete deployment ...?"
    http = httpx.Client(base_url=server.url, headers=server.headers, timeout=60)
    try:
        page.goto(f"{server.url}/#key={server.key}")
        for model in (a, b, c):
            expect(page.locator(f"#deploy-model option[value='{model}']")).to_be_attached()

        # Create: the name serves model a.
        page.fill("#deploy-name", name)
        page.select_option("#deploy-model", a)
        page.click("#deploy-button")
        expect(page.locator("#deploy-status")).to_have_text(f"Created {name}: serves {a}.")
        expect(page.locator("#deployment-detail")).to_be_visible()
        expect(page.locator("#deployment-title")).to_have_text(
            f"Deployment {name}: version 1, serves {a}"
        )
        assert page.input_value("#deploy-name") == ""
        # No request yet: the figures say so.
        expect(page.locator("#deployment-stats")).to_have_text("No request through this name yet.")

        # Split 90/10 between a (the incumbent) and b (the canary).
        page.select_option("#change-model", a)
        page.fill("#change-weight", "90")
        page.select_option("#change-second", b)
        page.fill("#change-second-weight", "10")
        page.click("#change-button")
        split = f"{a} 90 (90%), {b} 10 (10%)"
        expect(page.locator("#deployment-status")).to_have_text(
            f"{name} changed: version 2, serves {split}."
        )
        # And a shadow: c answers a copy of each request.
        page.select_option("#shadow-model", c)
        page.click("#shadow-button")
        expect(page.locator("#deployment-status")).to_have_text(
            f"{name} shadowed by {c}: version 3, serves {split}."
        )
        listed = page.eval_on_selector(
            "#deployments-list",
            """t => [...t.tBodies[0].rows].map(r => [...r.cells].slice(0, 5).map((c, i) =>
                 i === 4 ? c.querySelector("time").getAttribute("datetime") : c.textContent))""",
        )
        current = http.get(f"/v1/deployments/{name}").json()
        # (Other tests' deployments may share the database: this one's row.)
        assert [row for row in listed if row[0] == name] == [
            [name, split, c, "3", current["updated_at"]]
        ]
        # The form shows what it serves now.
        assert [page.input_value(f"#{i}") for i in ("change-model", "change-second")] == [a, b]
        assert [page.input_value(f"#{i}") for i in ("change-weight", "change-second-weight")] == [
            "90",
            "10",
        ]

        # Predictions through the name, as a client sends them.
        answered = Counter()
        for seed in range(PREDICTIONS):
            files = [("files", (f"{seed}.png", _png(seed), "image/png"))]
            response = http.post(f"/v1/deployments/{name}/predict", files=files)
            assert response.status_code == 200, response.text
            assert (response.json()["deployment"], response.json()["version"]) == (name, 3)
            answered[response.json()["model_id"]] += 1
        assert set(answered) == {a, b} and sum(answered.values()) == PREDICTIONS
        settled = _settle_stats(http, name, c, PREDICTIONS)

        # Refresh: the page's figures are GET .../stats's, one column per model.
        page.click("#stats-refresh")
        requests_row = page.locator(f"{FIGURES} tbody tr:nth-child(3)")
        expect(requests_row).to_have_text(f"Requests{answered[a]}{answered[b]}{PREDICTIONS}")
        seen = _figures_on_the_page(page)
        stats = http.get(f"/v1/deployments/{name}/stats").json()
        assert stats == settled  # nothing came in since
        assert [(m["model_id"], m["role"]) for m in stats["models"]] == [
            (a, "target"),
            (b, "target"),
            (c, "shadow"),
        ]
        assert [m["requests"] for m in stats["models"]] == [answered[a], answered[b], PREDICTIONS]
        expected = _expected_figures(stats)
        assert seen["caption"] == expected["caption"]
        assert seen["head"] == expected["head"]
        assert seen["rows"] == expected["rows"]
        assert seen["labelsHeader"] == "Top first labels"
        # (A style width comes back with six significant digits.)
        assert seen["labels"] == [
            [[label, count, pytest.approx(share, abs=1e-5)] for label, count, share in column]
            for column in expected["labels"]
        ]
        assert all(width > 0 for width in seen["barWidths"])  # the CSS draws them
        assert seen["rows"][1][1:] == ["90 (90%)", "10 (10%)", "–"]
        page.locator("#step-deployments").screenshot(path=str(shots / "deployment.png"))

        # Roll back: the shadow goes (back to version 2's targets and shadow).
        page.click("#rollback-button")
        expect(page.locator("#deployment-status")).to_have_text(
            f"{name} rolled back: version 4, serves {split}."
        )
        expect(page.locator("#deployment-title")).to_have_text(
            f"Deployment {name}: version 4, serves {split}"
        )
        assert page.input_value("#shadow-model") == ""
        history = http.get(f"/v1/deployments/{name}/history").json()["items"]
        one = {"targets": [{"model_id": a, "weight": 1}], "shadow_model_id": None}
        two = {
            "targets": [{"model_id": a, "weight": 90}, {"model_id": b, "weight": 10}],
            "shadow_model_id": None,
        }
        shadowed = {**two, "shadow_model_id": c}
        assert [(h["version"], h["action"], h["before"], h["after"]) for h in history] == [
            (4, "rolled_back", shadowed, two),
            (3, "updated", two, shadowed),
            (2, "updated", one, two),
            (1, "created", None, one),
        ]
        rows = _history_on_the_page(page)
        assert rows == [
            [
                str(h["version"]),
                h["action"].replace("_", " "),
                key_id,
                h["at"],
                _served(h["before"]),
                _served(h["after"]),
            ]
            for h in history
        ]
        assert rows[0][4:] == [f"{split}; shadow {c}", split]
        page.locator("#step-deployments").screenshot(path=str(shots / "rolled-back.png"))

        # Deleting through the list: the name stops answering, the detail goes.
        page.get_by_role("button", name=f"Delete deployment {name}").click()
        expect(page.locator("#deploy-status")).to_have_text(f"Deleted {name}.")
        expect(page.locator("#deployment-detail")).to_be_hidden()
        names = page.eval_on_selector(
            "#deployments-list", "t => [...t.tBodies[0].rows].map(r => r.cells[0].textContent)"
        )
        assert name not in names
        gone = http.get(f"/v1/deployments/{name}")
        assert (gone.status_code, gone.json()["error"]["code"]) == (404, "not_found")
    finally:
        page.screenshot(path=str(shots / "page.png"), full_page=True)
        page.close()
        http.close()
    assert errors.errors == []
