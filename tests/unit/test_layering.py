"""The layering of docs/architecture.md, checked on the import statements of every module."""

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
    # The client installs on machines without the ML stack: httpx, httpx-sse (and optionally
    # Pillow) only.
    "bitserve_client": ("bitcore", "service", "worker", "torch"),
    "service": ("worker",),
    "worker": (
        "fastapi",
        "starlette",
        "sse_starlette",
        "uvicorn",
        *(f"service.{name}" for name in ("app", "routers", "deps", "http_errors", "schemas")),
        *(f"service.{name}" for name in ("pagination", "request_bodies", "uploads", "metrics")),
        *(f"service.{name}" for name in ("auth", "audit_middleware")),
    ),
}
# The service's web layer: HTTP requests and answers. Nothing else in the service imports it.
WEB_LAYER = (
    "fastapi",
    "starlette",
    "sse_starlette",
    "uvicorn",
    "python_multipart",
    "service.app",
    "service.audit_middleware",
    "service.body_limits",
    "service.draining",
    "service.auth",
    "service.routers",
    "service.deps",
    "service.http_errors",
    "service.schemas",
    "service.schema_base",
    "service.plan_schemas",
    "service.pagination",
    "service.request_bodies",
    "service.uploads",
    "service.metrics",
    "service.openapi",
    "service.auth",
    "service.web_security",
    "service.connections",
    "service.job_events",
)
# The service's domain modules: plain functions over the database and the store, which the
# routes and the worker call. They raise service.domain_errors kinds and know no HTTP.
DOMAIN = (
    "admission",
    "api_keys",
    "archives",
    "audit",
    "broker",
    "datasets",
    "db",
    "domain_errors",
    "ids",
    "log_format",
    "names",
    "job_runs",
    "ingest_runs",
    "evaluations",
    "evaluation_runs",
    "dataset_sources",
    "job_states",
    "jobs",
    "models_store",
    "known_models",
    "quotas",
    "serving",
    "batching",
    "settings",
    "storage",
    "tables",
    "supervisor",
    "job_costs",
    "object_store",
    "local_cache",
    "sweep",
)


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


def violations(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in paths:
        for lineno, name in imported_names(path):
            for banned in forbidden:
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{path.relative_to(ROOT)}:{lineno} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_layering(package: str) -> None:
    assert (ROOT / package).is_dir()
    assert violations(sorted((ROOT / package).rglob("*.py")), FORBIDDEN[package]) == []


def test_the_domain_modules_know_no_web_layer() -> None:
    paths = [ROOT / "service" / f"{name}.py" for name in DOMAIN]
    assert all(path.is_file() for path in paths)
    assert violations(paths, WEB_LAYER) == []


def test_every_service_module_is_placed_in_a_layer() -> None:
    # A new module must be sorted into the domain or the web layer (and so be checked).
    web = {name.removeprefix("service.") for name in WEB_LAYER if name.startswith("service.")}
    modules = {p.stem for p in (ROOT / "service").glob("*.py") if p.stem != "__init__"}
    # The launcher and its `keys` commands: both layers, by design.
    assert modules - web - set(DOMAIN) == {"cli", "cli_keys"}


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
