"""Running `bitserve` as a user runs it: `run_cli` starts the entry point (`python -m
service.cli`) in a fresh subprocess, with only the URL, the key and a home from this
environment (cli_remote/, test_cli_deployments.py, test_deploy_to.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
FAST = ["--set", "steps=12", "--set", "batch_size=4", "--set", "crop=32", "--set", "precrop=40"]


@dataclass
class Run:
    rc: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    def json(self) -> Any:
        return json.loads(self.out)


Cli = Callable[..., Run]


def cli_env(url: str, key: str | None, home: Path) -> dict[str, str]:
    """No BITSERVE_* from this environment but the URL, the key (when given) and a home
    without an admin.key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITSERVE_")}
    env.update(BITSERVE_URL=url, BITSERVE_HOME=str(home), PYTHONPATH=str(REPO_ROOT))
    if key is not None:
        env["BITSERVE_API_KEY"] = key
    return env


def run_cli(
    url: str, key: str | None, *args: str, home: Path, cwd: Path = REPO_ROOT, timeout: float = 240
) -> Run:
    """`bitserve ARGS` in a fresh process (environment: cli_env)."""
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=cwd,
        env=cli_env(url, key, home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Run(done.returncode, done.stdout, done.stderr)
