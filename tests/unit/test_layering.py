"""The layering of docs/architecture.md, checked on the import statements of every module."""

from __future__ import annotations

import ast
import sys
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
    # The client installs on machines without the ML stack or the server: the third-party
    # packages it may import are CLIENT_PACKAGES (test_the_client_imports_only_light_packages).
    "bitserve_client": ("bitcore", "service", "worker", "torch"),
    "service": ("worker",),
    "worker": (
        "fastapi",
        "starlette",
        "sse_starlette",
        "uvicorn",
        *(f"service.{name}" for name in ("app", "routers", "deps", "http_errors", "schemas")),
        *(
            f"service.{name}"
            for name in ("pagination", "request_bodies", "uploads", "archive_uploads", "metrics")
        ),
        *(f"service.{name}" for name in ("auth", "audit_middleware")),
    ),
}
# Every third-party package bitserve_client may import: httpx and httpx-sse (and optionally
# Pillow, for PIL images to predict); its command line (bitserve_client/cli: `bitserve
# datasets|jobs|models|predict`) adds click and rich, and only the command line imports them.
# Nothing heavier (numpy, torch, the server's packages).
CLIENT_PACKAGES = {"httpx", "httpx_sse", "PIL"}
CLIENT_CLI_PACKAGES = CLIENT_PACKAGES | {"click", "rich"}
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
    "service.scoring_schemas",
    "service.schema_base",
    "service.plan_schemas",
    "service.pagination",
    "service.request_bodies",
    "service.uploads",
    "service.archive_uploads",
    "service.metrics",
    "service.openapi",
    "service.auth",
    "service.web_security",
    "service.connections",
    "service.job_events",
    "service.deployment_schemas",
    "service.admin_schemas",
    "service.predict_calls",
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
    "held_rows",
    "batch_predictions",
    "batch_prediction_runs",
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
    "deployments",
    "deployment_routing",
    "deployment_stats",
    "cli_settings",
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


def third_party(paths: list[Path], allowed: set[str]) -> list[str]:
    """Imports of top-level packages that are neither the standard library, bitserve_client
    itself, nor `allowed`."""
    found = []
    for path in paths:
        for lineno, name in imported_names(path):
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names | {"bitserve_client", "__future__"} | allowed:
                shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
                found.append(f"{shown}:{lineno} imports {name}")
    return found


def test_the_client_imports_only_light_packages() -> None:
    package = ROOT / "bitserve_client"
    cli = sorted((package / "cli").rglob("*.py"))
    library = sorted(set(package.rglob("*.py")) - set(cli))
    assert cli and library
    assert third_party(library, CLIENT_PACKAGES) == []
    assert third_party(cli, CLIENT_CLI_PACKAGES) == []


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


def test_the_client_check_catches_a_heavier_package(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import json\nimport click\nfrom numpy import array\nimport rich.table\n")
    assert third_party([bad], CLIENT_CLI_PACKAGES) == [
        "bad.py:3 imports numpy",
        "bad.py:3 imports numpy.array",
    ]
    assert len(third_party([bad], CLIENT_PACKAGES)) == 4  # click, numpy twice, rich.table
