"""The reference docs state what the code does: every setting's environment variable is in
docs/operations.md, and the parameter counts quoted in docs/bit.md are the models' own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import AliasChoices

from bitcore.models import IMAGENET21K_CLASSES, count_parameters
from service.settings import Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"
PUBLISHED_SIZES = ("R50x1", "R101x1", "R50x3", "R101x3", "R152x2", "R152x4")
PARAMS_HEADER = "| architecture |"


def env_names(name: str) -> list[str]:
    """The environment variables that set field `name`: its aliases, else prefix + NAME."""
    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        # The lower-case choice is the field name itself (for Settings(field=...) in code).
        return [c for c in alias.choices if isinstance(c, str) and c.isupper()]
    return [f"{Settings.model_config['env_prefix']}{name.upper()}"]


@pytest.fixture(scope="module")
def operations() -> str:
    return (DOCS / "operations.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_documented(field: str, operations: str):
    names = env_names(field)
    assert names, f"{field} has no environment variable"
    for env in names:
        # Backticked, so BITSERVE_PREDICT_MAX_QUEUE is not found inside ..._QUEUE_DELAY_MS.
        assert f"`{env}`" in operations, f"docs/operations.md does not mention `{env}` ({field})"


def test_operations_names_only_real_settings(operations: str):
    known = {env for field in Settings.model_fields for env in env_names(field)}
    mentioned = set(re.findall(r"\bBITSERVE_[A-Z0-9_]+\b", operations))
    assert mentioned <= known, f"not settings: {sorted(mentioned - known)}"


def parameter_table() -> dict[str, dict[str, str]]:
    """Rows of docs/bit.md's parameter table by architecture: {column header: cell text}."""
    lines = (DOCS / "bit.md").read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(PARAMS_HEADER)]
    assert len(starts) == 1, f"expected one table starting {PARAMS_HEADER!r} in docs/bit.md"
    header = [cell.strip() for cell in lines[starts[0]].strip("|").split("|")]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def as_int(text: str) -> int:
    assert re.fullmatch(r"\d{1,3}(,\d{3})*", text), f"not a whole number with commas: {text!r}"
    return int(text.replace(",", ""))


@pytest.mark.parametrize("size", PUBLISHED_SIZES)
def test_quoted_parameter_counts_are_the_models(size: str):
    row = parameter_table()[size]
    exact = as_int(row["parameters (1000-class head)"])
    # The same body for both families: the 1000-class count holds for BiT-S and BiT-M alike.
    assert exact == count_parameters(f"BiT-S-{size}") == count_parameters(f"BiT-M-{size}")
    assert float(row["millions"]) == round(exact / 1e6, 2)
    upstream = as_int(row["parameters (21843-class head)"])
    assert upstream == count_parameters(f"BiT-M-{size}", IMAGENET21K_CLASSES)


def test_parameter_table_lists_exactly_the_published_sizes():
    assert sorted(parameter_table()) == sorted(PUBLISHED_SIZES)


ROOT = DOCS.parent
SOURCES = ("bitcore", "service", "worker", "bitserve_client", "experiments", "benchmarks", "tests")
CITATION = re.compile(r"(?<![\w/.\-\"'])((?:docs/)?[\w-]+\.md)\b")
SHARED = "shared"  # spelled apart, so this file does not itself cite what it forbids
OUTSIDE = re.compile(rf"\.\./{SHARED}|{SHARED}/spec|{SHARED}/style")


def cited_docs(text: str) -> list[str]:
    return [m for m in CITATION.findall(text) if m not in ("README.md", "RESULTS.md")]


def test_the_code_cites_only_docs_of_this_repository() -> None:
    outside, missing = [], []
    for package in SOURCES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == Path(__file__).resolve():  # this test spells the patterns out
                continue
            text = path.read_text(encoding="utf-8")
            where = path.relative_to(ROOT)
            outside += [f"{where}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
            for cited in cited_docs(text):
                if not cited.startswith("docs/") or not (ROOT / cited).is_file():
                    missing.append(f"{where}: {cited}")
    assert outside == []
    assert missing == []


def test_the_citation_scan_sees_bad_citations() -> None:
    assert cited_docs('see docs/api.md and operations.md, "Serving"; README.md') == [
        "docs/api.md",
        "operations.md",
    ]
    assert OUTSIDE.search(f"(../{SHARED}/spec/bit.md)")


ERROR_KINDS = {
    "Conflict",
    "Gone",
    "InvalidRequest",
    "MalformedRequest",
    "QuotaExceeded",
    "TooLarge",
    "Unavailable",
    "UnsupportedMedia",
    "DatasetError",
}


def raised_error_codes(path: Path) -> set[str]:
    """The codes a module gives its errors: the first argument of an error kind's constructor,
    or of super().__init__ inside an error class; NotFound's is always "not_found"."""
    import ast

    codes = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = getattr(func, "id", None) or getattr(func, "attr", None)
        first = node.args[0]
        is_super_init = name == "__init__" and "super" in ast.dump(func)
        named = name in ERROR_KINDS or is_super_init
        if named and isinstance(first, ast.Constant) and isinstance(first.value, str):
            codes.add(first.value)
        if name == "NotFound":
            codes.add("not_found")
    return codes


def test_every_error_code_is_documented() -> None:
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    codes: set[str] = set()
    for path in [*(ROOT / "service").rglob("*.py"), *(ROOT / "bitcore" / "data").rglob("*.py")]:
        codes |= raised_error_codes(path)
    from service.http_errors import HTTP_CODES

    codes |= set(HTTP_CODES.values()) | {"internal_error", "invalid_request"}
    assert len(codes) > 30
    assert sorted(c for c in codes if f"`{c}`" not in api) == []
