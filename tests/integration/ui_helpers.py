"""What the page's tests share (test_ui_page.py, test_ui_scripts.py, test_ui_views.py,
test_ui_flows.py, test_ui_deployments.py): the static files' paths, the HTML parser that lists the
page's ids, node, and JavaScript's number formatting mirrored in Python."""

from __future__ import annotations

import shutil
from decimal import ROUND_HALF_UP, Decimal
from html.parser import HTMLParser
from pathlib import Path

import pytest

STATIC = Path(__file__).resolve().parents[2] / "service" / "static"
APP_JS = STATIC / "app.js"
CURVES_JS = STATIC / "curves.js"
QUALITY_JS = STATIC / "quality.js"
DEPLOYMENTS_JS = STATIC / "deployments.js"
UPLOT_JS = STATIC / "vendor" / "uplot" / "uPlot.iife.min.js"
# In the order index.html loads them (classic scripts: one global scope).
PAGE_SCRIPTS = [UPLOT_JS, CURVES_JS, QUALITY_JS, APP_JS, DEPLOYMENTS_JS]
# The scripts that talk to the API (through app.js's api()) and look elements up with $().
CALLING_SCRIPTS = [APP_JS, DEPLOYMENTS_JS]
SMOKE_JS = Path(__file__).resolve().parent / "ui_smoke.js"


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.tags: list[str] = []  # the tag of each id, in the same order
        self.label_for: list[str] = []
        self.controls: list[str] = []  # ids of input/select/textarea
        self.assets: list[str] = []  # src/href of script, link, img

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(str(a["id"]))
            self.tags.append(tag)
        if tag == "label" and a.get("for"):
            self.label_for.append(str(a["for"]))
        if tag in ("input", "select", "textarea"):
            self.controls.append(str(a.get("id")))
        if tag in ("script", "img") and a.get("src"):
            self.assets.append(str(a["src"]))
        if tag == "link" and a.get("href"):
            self.assets.append(str(a["href"]))


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    return node


def _to_fixed(value: float, digits: int) -> str:
    """JavaScript's value.toFixed(digits): an exact tie goes away from zero (Python's format
    rounds it to even: 81.25 -> "81.2" where JavaScript writes "81.3")."""
    step = Decimal(1).scaleb(-digits)
    return str(Decimal(value).quantize(step, rounding=ROUND_HALF_UP))


def _format_number(value: float, digits: int) -> str:
    """app.js's formatNumber: toExponential(2) below 1e-3, else toFixed(digits)."""
    if value != 0 and abs(value) < 1e-3:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return _to_fixed(value, digits)


def _js_percent(share: float) -> str:
    """`${share * 100}%` as JavaScript writes it (100, not 100.0)."""
    value = share * 100
    return f"{int(value)}%" if value.is_integer() else f"{value!r}%"
