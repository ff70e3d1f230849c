"""The layering of ../shared/style.md, checked on the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> top-level modules (or module prefixes) it must never import
FORBIDDEN = {
    "bitcore": (
        "fastapi",
        "starlette",
        "uvicorn",
        "celery",
        "kombu",
        "sqlalchemy",
        "alembic",
        "redis",
        "service",
        "worker",
    ),
    # The client installs on machines without the ML stack: httpx (and optionally Pillow) only.
    "bitserve_client": ("bitcore", "service", "worker", "torch"),
    "service": ("worker",),
    "worker": ("fastapi", "starlette", "uvicorn", "service.app", "service.routers", "service.deps"),
}


def imported_names(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append((node.lineno, node.module))
            names += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return names


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for lineno, name in imported_names(path):
            for banned in FORBIDDEN[package]:
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{path.relative_to(ROOT)}:{lineno} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_layering(package: str) -> None:
    assert (ROOT / package).is_dir()
    assert violations(package) == []


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom fastapi import FastAPI\nfrom service import app\n")
    assert imported_names(bad) == [
        (1, "os"),
        (2, "fastapi"),
        (2, "fastapi.FastAPI"),
        (3, "service"),
        (3, "service.app"),
    ]
