"""Following a job, a dataset's ingestion or an evaluation on the terminal, from the client's
event stream (BitserveClient.watch_job / watch_dataset: Server-Sent Events, else polling) or,
for an evaluation or a batch prediction (the API has no stream for them), from
`poll_evaluation`.

Two displays of the same events: on a terminal a live rich bar (stage, bar, count, figures);
anywhere else (a pipe, a CI log) plain lines: one when the stage changes (queued, preparing,
training, ...) and at most one progress line per PLAIN_INTERVAL_S, never a carriage return.
The caller prints the final summary line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from bitserve_client.cli import render
from bitserve_client.schema import JobEvent

# A CI log gets a progress line at most this often (stage changes are always printed).
PLAIN_INTERVAL_S = 5.0

Figures = tuple[float, float | None, str, str]  # completed, total (None: unknown), count, details


@dataclass(frozen=True)
class Kind:
    """What is followed: how its status and progress read as a stage, a line and a bar."""

    ended: frozenset[str]
    stage: Callable[[str | None, Mapping[str, Any]], str]
    line: Callable[[str, Mapping[str, Any]], str | None]
    figures: Callable[[str | None, Mapping[str, Any]], Figures]


def _job_line(job_id: str, progress: Mapping[str, Any]) -> str | None:
    if progress.get("phase") in ("downloading", "training"):
        return render.job_progress_line(job_id, progress)
    return None  # queued, preparing, evaluating: the stage line says it all


def _job_figures(status: str | None, progress: Mapping[str, Any]) -> Figures:
    if progress.get("phase") == "downloading":
        done, total = progress.get("downloaded_bytes") or 0, progress.get("total_bytes")
        return done, total, f"{render.fmt_bytes(done)}/{render.fmt_bytes(total)}", ""
    step, total = progress.get("step") or 0, progress.get("total_steps")
    details = render.job_progress_details(progress, live=status not in render.FINISHED)
    return step, total, f"{step}/{total if total is not None else '?'} steps", details


def _dataset_stage(status: str | None, progress: Mapping[str, Any]) -> str:
    if status == "processing":
        return str(progress.get("phase") or "processing")
    return status or "unknown"


def _dataset_line(dataset_id: str, progress: Mapping[str, Any]) -> str | None:
    if progress.get("done") is None:
        return None
    return render.dataset_progress_line(dataset_id, progress)


def _dataset_figures(status: str | None, progress: Mapping[str, Any]) -> Figures:
    if status in ("ready", "failed"):
        return 1, 1, "", ""  # a full bar, not a pulsing one: ingestion is over
    done, total = progress.get("done"), progress.get("total")
    if done is None:
        return 0, None, "", ""
    return done, total, f"{done}/{total if total is not None else '?'}", ""


JOB = Kind(
    frozenset(render.FINISHED),
    lambda status, progress: render.job_stage(status, progress.get("phase")),
    _job_line,
    _job_figures,
)
DATASET = Kind(frozenset({"ready", "failed"}), _dataset_stage, _dataset_line, _dataset_figures)


def _evaluation_line(evaluation_id: str, progress: Mapping[str, Any]) -> str | None:
    if progress.get("done") is None:
        return None
    return render.evaluation_progress_line(evaluation_id, progress)


def _evaluation_figures(status: str | None, progress: Mapping[str, Any]) -> Figures:
    if status in EVALUATION_ENDED:
        return 1, 1, "", ""
    done, total = progress.get("done"), progress.get("total")
    if done is None:
        return 0, None, "", ""
    return done, total, f"{done}/{total if total is not None else '?'} images", ""


EVALUATION_ENDED = frozenset({"succeeded", "failed"})
EVALUATION = Kind(
    EVALUATION_ENDED,
    lambda status, _: status or "unknown",
    _evaluation_line,
    _evaluation_figures,
)
# How often an evaluation is read while it runs: its worker stores the count of images scored
# about once a second (worker/evaluate.py's heartbeat), so reading it faster shows nothing new.
EVALUATION_POLL_S = 1.0


def _batch_line(batch_id: str, progress: Mapping[str, Any]) -> str | None:
    if progress.get("shards_total") is None:
        return None  # no worker has read the dataset yet: the stage line says it all
    return render.batch_progress_line(batch_id, progress)


def _batch_figures(status: str | None, progress: Mapping[str, Any]) -> Figures:
    if status in BATCH_ENDED:
        return 1, 1, "", ""
    done, total = progress.get("images_done") or 0, progress.get("images_total")
    if total is None:
        return 0, None, "", ""
    shards = f"shard {progress.get('shards_done') or 0}/{progress.get('shards_total')}"
    return done, total, f"{done}/{total} images", shards


BATCH_ENDED = frozenset(render.FINISHED)
BATCH = Kind(BATCH_ENDED, lambda status, _: status or "unknown", _batch_line, _batch_figures)


def poll_evaluation(
    get: Callable[[str], Mapping[str, Any]],
    first: Mapping[str, Any],
    *,
    interval: float = EVALUATION_POLL_S,
    sleep: Callable[[float], object] = time.sleep,
    ended: frozenset[str] = EVALUATION_ENDED,
) -> Iterator[JobEvent]:
    """An evaluation's (or, with `ended` = BATCH_ENDED, a batch prediction's) changes as the
    events `follow` reads (`status` when its status changes, `progress` when its count does,
    `done` once it has ended), by reading it with `get` (the client's get_evaluation or
    get_batch_prediction) every `interval` seconds."""
    current = dict(first)
    while current.get("status") not in ended:
        sleep(interval)
        now = dict(get(str(first["id"])))
        if now.get("status") not in ended:
            if now.get("status") != current.get("status"):
                yield JobEvent("status", now)
            if now.get("progress") and now.get("progress") != current.get("progress"):
                yield JobEvent("progress", dict(now["progress"]))
        current = now
    yield JobEvent("done", current)


class Reporter(Protocol):
    def update(self, event: str, data: Mapping[str, Any]) -> None: ...

    def __enter__(self) -> Reporter: ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class _State:
    """The followed object's status and progress, from `status` (the whole object),
    `progress` and `done` events alike."""

    def __init__(self) -> None:
        self.status: str | None = None
        self.progress: Mapping[str, Any] = {}

    def apply(self, event: str, data: Mapping[str, Any]) -> None:
        if event in ("status", "done"):
            self.status = data.get("status")
            self.progress = data.get("progress") or {}
        elif event == "progress":
            self.progress = data


class PlainLines:
    """Lines for a pipe or a log: the stage when it changes, progress at most every
    `interval` seconds (by `clock`), nothing once the object has ended (the summary follows)."""

    def __init__(
        self,
        kind: Kind,
        object_id: str,
        write: Callable[[str], object],
        *,
        interval: float = PLAIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kind, self.id, self.write = kind, object_id, write
        self.interval, self.clock = interval, clock
        self.state = _State()
        self.last_stage: str | None = None
        self.last_line_at: float | None = None

    def update(self, event: str, data: Mapping[str, Any]) -> None:
        self.state.apply(event, data)
        if self.state.status in self.kind.ended:
            return
        stage = self.kind.stage(self.state.status, self.state.progress)
        if stage != self.last_stage:
            self.last_stage = stage
            self.write(f"{self.id}: {stage}")
        if event != "progress":
            return
        line = self.kind.line(self.id, self.state.progress)
        now = self.clock()
        if line is not None and (
            self.last_line_at is None or now - self.last_line_at >= self.interval
        ):
            self.last_line_at = now
            self.write(line)

    def __enter__(self) -> PlainLines:
        return self

    def __exit__(self, *_: object) -> None:
        return None


class LiveBar:
    """A rich progress bar on a terminal: stage, bar, count (steps, bytes, images), figures."""

    def __init__(self, kind: Kind, console: Console) -> None:
        self.kind = kind
        self.state = _State()
        self.bar = Progress(
            TextColumn("{task.fields[stage]:<11}"),
            BarColumn(),
            TextColumn("{task.fields[count]}"),
            TextColumn("{task.fields[details]}"),
            console=console,
            redirect_stdout=False,
            redirect_stderr=False,
            refresh_per_second=4,
        )
        self.task = self.bar.add_task("", total=None, stage="", count="", details="")

    def update(self, event: str, data: Mapping[str, Any]) -> None:
        self.state.apply(event, data)
        completed, total, count, details = self.kind.figures(self.state.status, self.state.progress)
        stage = self.kind.stage(self.state.status, self.state.progress)
        # Drawn at once (events come a few a second at most): no event is skipped unseen.
        self.bar.update(
            self.task,
            completed=completed,
            total=total,
            stage=stage,
            count=count,
            details=details,
            refresh=True,
        )

    def __enter__(self) -> LiveBar:
        self.bar.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.bar.stop()


def reporter(kind: Kind, object_id: str, stream: IO[str], console: Console) -> Reporter:
    """A live bar when `stream` is a terminal, plain lines otherwise."""
    if stream.isatty():
        return LiveBar(kind, console)

    def write(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    return PlainLines(kind, object_id, write)


def follow(
    events: Iterator[JobEvent], first: Mapping[str, Any], display: Reporter
) -> dict[str, Any]:
    """Show `first` (the object as it is now), then each event, until `done`; return the
    final object."""
    final = dict(first)
    with display:
        display.update("status", first)
        for event in events:
            display.update(event.event, event.data)
            if event.event == "done":
                final = event.data
                break
    return final
