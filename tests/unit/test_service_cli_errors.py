"""`bitserve` start-up errors through the real command: one line naming the variable or path,
exit status 2, no traceback (issue 17)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import bitcore

REPO = Path(__file__).resolve().parents[2]


def _bitserve(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BITSERVE_")}
    for name in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"):
        environment.pop(name, None)
    environment.update({"BITSERVE_HOME": str(tmp_path / "home"), **env})
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("command", ["migrate", "up", "api"])
def test_impossible_home_is_one_line_naming_it(tmp_path: Path, command: str) -> None:
    (tmp_path / "file").write_text("")
    home = tmp_path / "file" / "home"  # below a file: can never be created
    done = _bitserve(
        [command, "--port", "0"] if command != "migrate" else [command],
        tmp_path,
        BITSERVE_HOME=str(home),
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"bitserve: BITSERVE_HOME={home} cannot be used (not a directory); set BITSERVE_HOME "
        "to a writable directory\n"
    )
    assert done.stdout == ""


def test_home_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "home").write_text("")
    done = _bitserve(["migrate"], tmp_path)
    assert (done.returncode, done.stderr) == (
        2,
        f"bitserve: BITSERVE_HOME={tmp_path / 'home'} is not a writable directory; set "
        "BITSERVE_HOME to one\n",
    )


def test_non_numeric_port_names_the_variable_and_type(tmp_path: Path) -> None:
    done = _bitserve(["up"], tmp_path, BITSERVE_PORT="abc")
    assert done.returncode == 2
    assert done.stderr == (
        "bitserve: BITSERVE_PORT='abc' is not valid: input should be a valid integer, unable "
        "to parse string as an integer\n"
    )
    assert not (tmp_path / "home").exists()  # nothing was created


def test_version_and_help_examples(tmp_path: Path) -> None:
    done = _bitserve(["--version"], tmp_path)
    assert (done.returncode, done.stdout) == (0, f"bitserve {bitcore.__version__}\n")
    done = _bitserve(["--help"], tmp_path)
    assert done.returncode == 0 and "examples:\n  bitserve up" in done.stdout
