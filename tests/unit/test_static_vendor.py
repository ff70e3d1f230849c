"""The web page's files: the vendored uPlot is the npm release its README names (hashes and
version), every file the page route serves exists and is packaged, and nothing under static/
that the page needs is left out of the route."""

from __future__ import annotations

import glob
import hashlib
import re
import tomllib
from pathlib import Path

from service.routers.ui import STATIC, STATIC_DIR

REPO = Path(__file__).resolve().parents[2]
VENDOR = STATIC_DIR / "vendor" / "uplot"
UPLOT_VERSION = "1.6.32"
# Files kept beside the served ones, for people: never sent to a browser.
NOT_SERVED = {"vendor/uplot/README.md", "vendor/uplot/LICENSE"}


def test_the_vendored_uplot_is_the_release_its_readme_names() -> None:
    readme = (VENDOR / "README.md").read_text()
    listed = dict(re.findall(r"^\| `([^`]+)` \| `[^`]+` \| `([0-9a-f]{64})` \|$", readme, re.M))
    assert sorted(listed) == ["LICENSE", "uPlot.iife.min.js", "uPlot.min.css"]
    for name, digest in listed.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
    assert f"`uplot` {UPLOT_VERSION}" in readme
    banner = (VENDOR / "uPlot.iife.min.js").read_text().splitlines()[0]
    assert banner == f"/*! https://github.com/leeoniya/uPlot (v{UPLOT_VERSION}) */"
    # uPlot sets styles through element.style only: the page's CSP would block a style attribute.
    assert 'setAttribute("style"' not in (VENDOR / "uPlot.iife.min.js").read_text()
    assert "MIT License" in (VENDOR / "LICENSE").read_text()


def test_every_served_file_exists_and_every_static_file_is_served() -> None:
    on_disk = {p.relative_to(STATIC_DIR).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()}
    assert set(STATIC) <= on_disk, set(STATIC) - on_disk
    assert on_disk - set(STATIC) == NOT_SERVED


def test_the_package_data_carries_every_static_file() -> None:
    """setuptools expands package-data patterns with glob (recursive): the same expansion here."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["service"]
    root = STATIC_DIR.parent
    packaged = {
        Path(match).as_posix()
        for pattern in patterns
        for match in glob.glob(pattern, root_dir=root, recursive=True)
        if (root / match).is_file()
    }
    assert {f"static/{name}" for name in STATIC} <= packaged
