"""Issue 11: "dependencies beyond torch are unpinned". The lock files must cover pyproject.toml:
every dependency pinned exactly, with hashes, at a version its specifier allows, and (checked
against the installed packages' metadata) everything those pins need in turn. `make install`
in a fresh venv, with `pip check`, is the end-to-end proof (docs/operations.md, "Dependencies").
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# What the locks were compiled for (the Makefile's `make lock`, on CI's platform).
TARGET = {**default_environment(), "python_version": "3.11", "sys_platform": "linux"}
TARGET |= {"platform_system": "Linux", "platform_machine": "x86_64"}
UNLOCKED = {"torch"}  # pinned by version in the Makefile and the Dockerfile (a local wheel)


def read_lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip-compile lock file."""
    text = (ROOT / name).read_text()
    pins: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", block)
        if match:
            hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
            pins[canonicalize_name(match.group(1))] = (match.group(2), hashes)
    return pins


def requirements(extra: str | None) -> list[Requirement]:
    listed = PYPROJECT["dependencies"] + (
        PYPROJECT["optional-dependencies"][extra] if extra else []
    )
    return [Requirement(text) for text in listed]


LOCKS = [("requirements.lock", None), ("requirements-dev.lock", "dev")]


@pytest.mark.parametrize(("lock", "extra"), LOCKS)
def test_every_pyproject_dependency_is_pinned_with_hashes(lock: str, extra: str | None) -> None:
    pins = read_lock(lock)
    assert len(pins) > 40
    for requirement in requirements(extra):
        name = canonicalize_name(requirement.name)
        if name in UNLOCKED:
            assert str(requirement.specifier) == "==2.13.0"  # exact, as the Makefile installs
            assert name not in pins
            continue
        assert name in pins, f"{requirement} is not in {lock}: run `make lock`"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (requirement, version)
    assert all(hashes for _, hashes in pins.values()), "every pin needs --hash lines"


@pytest.mark.parametrize(("lock", "extra"), LOCKS)
def test_the_lock_is_closed_under_dependencies(lock: str, extra: str | None) -> None:
    """What each locked package (and torch) needs on Linux / Python 3.11, extras included, is
    locked too, so `pip install --no-deps -r <lock>` leaves nothing out. Read from the metadata
    of the packages installed here (the same versions `make install` puts in)."""
    pins = read_lock(lock)
    wanted: list[tuple[str, set[str]]] = [
        (r.name, set(r.extras))
        for r in requirements(extra)
        if r.marker is None or r.marker.evaluate(TARGET)
    ]
    seen: set[tuple[str, frozenset[str]]] = set()
    missing: list[str] = []
    while wanted:
        name, extras = wanted.pop()
        key = (canonicalize_name(name), frozenset(extras))
        if key in seen:
            continue
        seen.add(key)
        if key[0] not in pins and key[0] not in UNLOCKED:
            missing.append(name)
            continue
        try:
            needs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in needs:
            requirement = Requirement(text)
            applies = any(
                requirement.marker is None or requirement.marker.evaluate({**TARGET, "extra": e})
                for e in extras | {""}
            )
            if applies:
                wanted.append((requirement.name, set(requirement.extras)))
    assert missing == [], f"needed but not in {lock}: {sorted(set(missing))}"


def test_the_runtime_lock_agrees_with_the_dev_lock() -> None:
    runtime, dev = read_lock("requirements.lock"), read_lock("requirements-dev.lock")
    assert set(runtime) <= set(dev)
    assert {name: runtime[name][0] for name in runtime} == {name: dev[name][0] for name in runtime}


def test_make_install_is_hash_checked_and_reruns_when_the_lock_changes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "$(STAMP): pyproject.toml $(LOCK)" in makefile
    assert "pip install --quiet --require-hashes --no-deps -r $(LOCK)" in makefile
    assert 'pip install --quiet --no-deps "torch==2.13.0"' in makefile
    assert "$(BIN)/python -m pip check" in makefile
    assert "make install" in (ROOT / ".ci" / "run").read_text()
