"""bitserve_client.cli without a server, following a job or a dataset: the plain progress lines
for pipes (each stage once, progress at most every interval) and the live bar for terminals.
Against a live server: tests/integration/cli_remote/."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from rich.console import Console

from bitserve_client.cli import watch
from bitserve_client.schema import JobEvent
from tests.unit.cli_remote_helpers import JOB_ID, Clock, Terminal, job, progress

# -- following -----------------------------------------------------------------------------------


def test_plain_lines_say_each_stage_once_and_progress_at_most_every_interval() -> None:
    clock, lines = Clock(), []
    display = watch.PlainLines(watch.JOB, JOB_ID, lines.append, interval=5.0, clock=clock)
    queued = job("queued", 0, progress=progress(0, phase=None))
    running = {**queued, "status": "running"}
    events: list[tuple[float, str, dict[str, Any]]] = [
        (0.0, "status", queued),
        (1.0, "status", running),  # running, no phase yet
        (1.5, "progress", progress(0, phase="preparing")),
        (2.0, "progress", progress(1, loss=0.9, eta_seconds=30)),  # first line: at once
        (3.0, "progress", progress(2, loss=0.8)),  # 1 s later: skipped
        (7.0, "progress", progress(8, loss=0.5, images_per_second=20.0)),  # 5 s: printed
        (8.0, "progress", progress(12, loss=0.4, phase="evaluating")),
        (9.0, "status", job("succeeded")),  # ended: the caller prints the summary
        (9.0, "done", job("succeeded")),
    ]
    for at, event, data in events:
        clock.now = 100.0 + at
        display.update(event, data)
    assert lines == [
        f"{JOB_ID}: queued",
        f"{JOB_ID}: running",
        f"{JOB_ID}: preparing",
        f"{JOB_ID}: training",
        f"{JOB_ID}: step 1/12, loss 0.9000, ETA 30s",
        f"{JOB_ID}: step 8/12, loss 0.5000, 20.0 images/s",
        f"{JOB_ID}: evaluating",
    ]


def test_plain_lines_of_a_dataset() -> None:
    clock, lines = Clock(), []
    display = watch.PlainLines(watch.DATASET, "ds_x", lines.append, interval=5.0, clock=clock)
    processing = {"id": "ds_x", "status": "processing", "progress": {"phase": "queued"}}
    display.update("status", processing)
    display.update("progress", {"id": "ds_x", "phase": "extracting", "done": 0, "total": 9})
    clock.now += 6
    display.update("progress", {"id": "ds_x", "phase": "indexing", "done": 4, "total": 9})
    display.update("status", {"id": "ds_x", "status": "ready", "progress": None})
    assert lines == [
        "ds_x: queued",
        "ds_x: extracting",
        "ds_x: extracting 0/9",
        "ds_x: indexing",
        "ds_x: indexing 4/9",
    ]


def test_a_terminal_gets_a_live_bar_and_follow_returns_the_final_job() -> None:
    stream = Terminal()
    console = Console(file=stream, force_terminal=True, width=120)
    display = watch.reporter(watch.JOB, JOB_ID, stream, console)
    assert isinstance(display, watch.LiveBar)
    done = job("succeeded", model_id="mdl_x")

    def events() -> Iterator[JobEvent]:
        yield JobEvent("progress", progress(6, loss=0.5, images_per_second=10.0))
        yield JobEvent("done", done)
        raise AssertionError("read past done")  # pragma: no cover

    assert watch.follow(events(), job("running", 0), display) == done
    text = stream.getvalue()
    assert "\r" in text or "\x1b[" in text  # redrawn in place
    assert "6/12 steps" in text and "loss 0.5000, 10.0 images/s" in text
    assert "12/12 steps" in text  # the final state, without the stale speed
    assert "12/12 steps loss 0.0412" in text.replace("\x1b[0m", "")
    # A pipe gets plain lines instead.
    assert isinstance(watch.reporter(watch.JOB, JOB_ID, io.StringIO(), console), watch.PlainLines)
