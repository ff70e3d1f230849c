"""What the tests of bitserve_client.cli without a server share (test_cli_render.py,
test_cli_follow.py, test_cli_evaluations_batches.py): a job and its progress as the API shows
them, a table rendered to its lines, a clock the test moves and a stream that is a terminal."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from bitserve_client.cli.remote import show

JOB_ID = "job_abcdefghijklmnopqrst"


def progress(step: int, **fields: Any) -> dict[str, Any]:
    base = {
        "step": step,
        "total_steps": 12,
        "loss": None,
        "lr": None,
        "images_per_second": None,
        "eta_seconds": None,
        "phase": "training",
        "downloaded_bytes": None,
        "total_bytes": None,
    }
    return {**base, **fields}


def job(status: str, step: int = 12, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": JOB_ID,
        "status": status,
        "progress": progress(step, loss=0.0412, phase="done" if status == "succeeded" else None),
        "error": None,
        "model_id": None,
        "metrics": None,
    }
    return {**base, **fields}


def rendered(renderable: Any) -> list[str]:
    stream = io.StringIO()
    show(Console(file=stream, width=1000), renderable)
    return stream.getvalue().splitlines()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True
