"""One table from error kind to HTTP status (service.http_errors.STATUS), and no status
anywhere else in the service."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import service
from service import domain_errors as errors
from service.archives import ArchiveInvalid, ArchiveTooLarge, ArchiveUnsafe, NotAnArchive
from service.http_errors import STATUS, domain_error_response, status_of

SERVICE = Path(service.__file__).resolve().parent


def all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *all_subclasses(sub)}
    return found


def test_every_error_kind_has_exactly_one_status() -> None:
    for module in pkgutil.walk_packages(service.__path__, "service."):
        importlib.import_module(module.name)  # every DomainError subclass is defined now
    kinds = all_subclasses(errors.DomainError)
    assert len(kinds) >= 13
    for kind in kinds:
        mapped = [cls for cls in kind.__mro__ if cls in STATUS]
        assert mapped, f"{kind.__name__} has no HTTP status in service.http_errors.STATUS"


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (errors.NotFound("job", "job_x"), 404, "not_found"),
        (errors.Conflict("job_finished", "m"), 409, "job_finished"),
        (errors.InvalidRequest("invalid_override", "m"), 422, "invalid_override"),
        (errors.MalformedRequest("invalid_cursor", "m"), 400, "invalid_cursor"),
        (errors.payload_too_large(10), 413, "payload_too_large"),
        (errors.UnsupportedMedia("unsupported_media_type", "m"), 415, "unsupported_media_type"),
        (errors.Gone("artifact_missing", "m"), 410, "artifact_missing"),
        (ArchiveTooLarge("m", limit=1), 413, "archive_too_large"),
        (ArchiveUnsafe("m", path="../x"), 422, "archive_unsafe"),
        (ArchiveInvalid("m"), 422, "archive_invalid"),
        (NotAnArchive("m"), 415, "unsupported_media_type"),
    ],
)
def test_kinds_answer_their_status_in_the_error_shape(
    error: errors.DomainError, status: int, code: str
) -> None:
    assert status_of(error) == status
    response = domain_error_response(error)
    assert response.status_code == status
    assert response.body.startswith(f'{{"error":{{"code":"{code}","message":'.encode())
    assert "retry-after" not in response.headers


def test_unavailable_carries_its_retry_after() -> None:
    response = domain_error_response(errors.Unavailable("overloaded", "busy", retry_after=7))
    assert (response.status_code, response.headers["retry-after"]) == (503, "7")


def test_an_unmapped_kind_is_a_bug() -> None:
    class Orphan(errors.DomainError):
        pass

    with pytest.raises(LookupError, match="Orphan has no HTTP status"):
        status_of(Orphan("x", "y"))


def http_statuses_outside_the_table(path: Path) -> list[str]:
    """Error statuses (4xx/5xx) in raise statements or status_code arguments, and direct
    calls of error_response: all of that belongs in service.http_errors."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Raise):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Constant) and _is_error_status(inner.value):
                    found.append(f"{path.name}:{node.lineno} raises with {inner.value}")
        if isinstance(node, ast.keyword) and node.arg in ("status_code", "status"):
            value = node.value
            if isinstance(value, ast.Constant) and _is_error_status(value.value):
                found.append(f"{path.name}:{value.lineno} {node.arg}={value.value}")
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "error_response":
            found.append(f"{path.name}:{node.lineno} calls error_response")
    return sorted(found, key=lambda line: int(line.split(":")[1].split()[0]))


def _is_error_status(value: object) -> bool:
    return type(value) is int and 400 <= value < 600


def test_no_http_status_lives_outside_the_table() -> None:
    found = []
    for path in sorted(SERVICE.rglob("*.py")):
        if path.name != "http_errors.py":
            found += http_statuses_outside_the_table(path)
    assert found == []


def test_the_scan_catches_a_status(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "raise ApiError(404, 'x', 'y')\n"
        "Response(status_code=503)\n"
        "error_response(409, 'c', 'm')\n"
        "Response(status_code=204)\n"
    )
    assert http_statuses_outside_the_table(bad) == [
        "bad.py:1 raises with 404",
        "bad.py:2 status_code=503",
        "bad.py:3 calls error_response",
    ]
