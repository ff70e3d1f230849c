"""bitserve_client.cli without a server: the text it prints (summaries, progress lines,
tables), the plain progress lines for pipes and the live bar for terminals, --set parsing,
usage errors (exit 2), a service that is not running (exit 1, one line) and the dispatch from
the `bitserve` entry point. Against a live server: tests/integration/test_cli_remote.py."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from bitserve_client.cli import COMMANDS, main, render, watch
from bitserve_client.cli.jobs import parse_override
from bitserve_client.cli.models import PREDICT_BATCH_IMAGES, batches
from bitserve_client.cli.remote import Remote, show
from bitserve_client.schema import JobEvent
from service import cli as service_cli

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


# -- numbers and lines -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "text"),
    [(None, "?"), (0, "0 B"), (999, "999 B"), (56_700, "56.7 kB"), (1_234_567, "1.2 MB")],
)
def test_fmt_bytes(count: int | None, text: str) -> None:
    assert render.fmt_bytes(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "?"), (0.4, "0s"), (45, "45s"), (185, "3m05s"), (3725, "1h02m"), (-3, "0s")],
)
def test_fmt_duration(seconds: float | None, text: str) -> None:
    assert render.fmt_duration(seconds) == text


def test_fmt_time_and_percent() -> None:
    assert render.fmt_time("2026-12-02T08:30:00.123456Z") == "2026-12-02 08:30:00Z"
    assert render.fmt_time(None) == "-"
    assert (render.fmt_percent(0.875), render.fmt_percent(None)) == ("87.5%", "-")


def test_the_summary_of_a_job_that_succeeded() -> None:
    done = job("succeeded", model_id="mdl_x", metrics={"accuracy": 0.875})
    assert render.job_summary(done) == (
        f"job {JOB_ID} succeeded: 12/12 steps, final loss 0.0412, accuracy 87.5%, model mdl_x"
    )
    no_split = job("succeeded", model_id="mdl_x", metrics={"accuracy": None})
    assert render.job_summary(no_split) == (
        f"job {JOB_ID} succeeded: 12/12 steps, final loss 0.0412, "
        "no validation accuracy (no validation split), model mdl_x"
    )


def test_the_summary_of_a_job_that_failed_or_was_cancelled() -> None:
    error = {"code": "out_of_memory", "message": "try micro_batch_size 8"}
    assert render.job_summary(job("failed", 3, error=error)) == (
        f"job {JOB_ID} failed: 3/12 steps, final loss 0.0412, "
        "error out_of_memory: try micro_batch_size 8"
    )
    queued = job("cancelled", 0, progress=progress(0, phase=None))
    assert render.job_summary(queued) == f"job {JOB_ID} cancelled: 0/12 steps"


def test_progress_lines() -> None:
    training = progress(6, loss=0.69314, images_per_second=52.34, eta_seconds=4.2)
    assert render.job_progress_line(JOB_ID, training) == (
        f"{JOB_ID}: step 6/12, loss 0.6931, 52.3 images/s, ETA 4s"
    )
    assert render.job_progress_line(JOB_ID, training, live=False) == (
        f"{JOB_ID}: step 6/12, loss 0.6931"
    )
    assert render.job_progress_line(JOB_ID, progress(0)) == f"{JOB_ID}: step 0/12"
    download = progress(0, phase="downloading", downloaded_bytes=12_000_000, total_bytes=98_000_000)
    assert render.job_progress_line(JOB_ID, download) == (
        f"{JOB_ID}: downloading the base checkpoint, 12.0 MB of 98.0 MB"
    )
    assert render.dataset_progress_line("ds_x", {"phase": "indexing", "done": 3, "total": 9}) == (
        "ds_x: indexing 3/9"
    )
    assert render.dataset_progress_line("ds_x", {"phase": "queued", "done": None}) == "ds_x: queued"


def test_dataset_summary() -> None:
    ready = {
        "id": "ds_x",
        "name": "pets",
        "status": "ready",
        "num_images": 40,
        "num_classes": 2,
        "rejected_count": 3,
        "rejected_reasons": {"unsupported_format": 2, "truncated": 1},
    }
    assert render.dataset_summary(ready) == (
        "dataset ds_x ready: 40 images in 2 classes (pets), "
        "3 files rejected (unsupported_format 2, truncated 1)"
    )
    assert render.dataset_summary({**ready, "rejected_count": 0}) == (
        "dataset ds_x ready: 40 images in 2 classes (pets)"
    )
    failed = {
        "id": "ds_x",
        "status": "failed",
        "error": {"code": "too_few_classes", "message": "m"},
    }
    assert render.dataset_summary(failed) == "dataset ds_x failed: too_few_classes: m"


def rendered(renderable: Any) -> list[str]:
    stream = io.StringIO()
    show(Console(file=stream, width=1000), renderable)
    return stream.getvalue().splitlines()


def test_tables_have_no_padding_and_take_no_markup() -> None:
    items = [
        {
            "id": "ds_a",
            "name": "[bold]pets[/bold]",  # a user's name: printed as written
            "status": "processing",
            "progress": {"phase": "indexing", "done": 1, "total": 4},
            "num_images": 0,
            "num_classes": 0,
            "bytes": 1500,
            "created_at": "2026-12-02T08:30:00.5Z",
        }
    ]
    assert rendered(render.datasets_table(items)) == [
        "ID    NAME               STATUS                 IMAGES  CLASSES  SIZE    CREATED",
        "ds_a  [bold]pets[/bold]  processing (indexing)  0       0        1.5 kB  2026-12-02 08:30:00Z",
    ]


def test_predictions_table() -> None:
    one = [[{"label": "cat", "score": 0.98765}], [{"label": "dog", "score": 0.5}]]
    assert rendered(render.predictions_table(["a.png", "b b.png"], one)) == [
        "FILE     LABEL  SCORE",
        "a.png    cat    0.9877",
        "b b.png  dog    0.5000",
    ]
    two = [[{"label": "cat", "score": 0.9}, {"label": "dog", "score": 0.1}]]
    assert rendered(render.predictions_table(["a.png"], two)) == [
        "FILE   LABEL  SCORE   NEXT",
        "a.png  cat    0.9000  dog 0.1000",
    ]


# -- evaluations -------------------------------------------------------------------------------


def evaluation(status: str = "succeeded", **fields: Any) -> dict[str, Any]:
    result = {
        "accuracy": 0.75,
        "loss": 0.61234,
        "macro_f1": 0.733333,
        "num_examples": 12,
        "per_class": [],
        "confusion_matrix": [[4, 0, 0], [2, 1, 0], [1, 0, 4]],
        "top_k_accuracy": {"1": 0.75, "3": 1.0},
        "most_confused": [
            {"label": "bee", "predicted": "ant", "count": 2},
            {"label": "cow", "predicted": "ant", "count": 1},
        ],
        "classes": ["ant", "bee", "cow"],
        "labels_evaluated": ["ant", "bee", "cow"],
        "skipped": 0,
        "worst": [],
    }
    base: dict[str, Any] = {
        "id": "eval_x",
        "model_id": "mdl_y",
        "dataset_id": "ds_z",
        "source": "dataset",
        "status": status,
        "progress": None,
        "result": result if status == "succeeded" else None,
        "error": None,
        "created_at": "2026-12-02T08:30:00.5Z",
    }
    return {**base, **fields}


def test_an_evaluation_in_plain_lines() -> None:
    assert render.evaluation_lines(evaluation()) == [
        "evaluation eval_x succeeded",
        "model: mdl_y",
        "scored on: dataset ds_z",
        "images: 12",
        "accuracy: 75.0%",
        "macro-F1: 0.7333",
        "top-3 accuracy: 100.0%",
        "loss: 0.6123",
        "most confused (true -> predicted): bee -> ant 2, cow -> ant 1",
    ]
    assert render.evaluation_summary(evaluation()) == (
        "evaluation eval_x succeeded: 12 images, accuracy 75.0%, macro-F1 0.7333, "
        "top-3 accuracy 100.0%"
    )


def test_an_evaluation_without_top_3_skipped_images_or_confusion() -> None:
    done = evaluation()
    result = {
        **done["result"],
        "top_k_accuracy": {"1": 1.0},
        "classes": ["ant", "bee"],
        "most_confused": [],
        "skipped": 2,
    }
    lines = render.evaluation_lines({**done, "result": result})
    assert lines[3:] == [
        "images: 12 (2 skipped: could not be decoded)",
        "accuracy: 75.0%",
        "macro-F1: 0.7333",
        "top-3 accuracy: - (the model has 2 classes)",
        "loss: 0.6123",
        "most confused (true -> predicted): none",
    ]
    assert render.confused_table(result) is None
    # The fine-tune's own validation result: scored top-1 only, on no dataset.
    validation = {**done, "source": "validation", "dataset_id": None}
    validation["result"] = {**done["result"], "top_k_accuracy": None, "loss": None}
    assert render.evaluation_lines(validation)[2:8] == [
        "scored on: the fine-tune's validation images",
        "images: 12",
        "accuracy: 75.0%",
        "macro-F1: 0.7333",
        "top-3 accuracy: - (not measured)",
        "loss: -",
    ]


def test_an_evaluation_on_a_terminal_is_two_tables() -> None:
    done = evaluation()
    assert rendered(render.details_table(render.evaluation_figures(done))) == [
        "evaluation      eval_x",
        "model           mdl_y",
        "scored on       dataset ds_z",
        "images          12",
        "accuracy        75.0%",
        "macro-F1        0.7333",
        "top-3 accuracy  100.0%",
        "loss            0.6123",
    ]
    assert rendered(render.confused_table(done["result"])) == [
        "TRUE LABEL  PREDICTED  IMAGES",
        "bee         ant        2",
        "cow         ant        1",
    ]


def test_evaluations_table_and_lines() -> None:
    items = [
        evaluation("running", progress={"done": 40, "total": 120}, result=None),
        evaluation("queued", id="eval_q", progress={"done": 0, "total": None}),
        evaluation("failed", id="eval_f", error={"code": "unknown_labels", "message": "m"}),
        evaluation(id="eval_v", source="validation", dataset_id=None),
    ]
    assert rendered(render.evaluations_table(items)) == [
        "ID      SOURCE      STATUS                  ACCURACY  MACRO-F1  IMAGES  DATASET  CREATED",
        "eval_x  dataset     running 40/120          -         -         -       ds_z     2026-12-02 08:30:00Z",
        "eval_q  dataset     queued                  -         -         -       ds_z     2026-12-02 08:30:00Z",
        "eval_f  dataset     failed: unknown_labels  -         -         -       ds_z     2026-12-02 08:30:00Z",
        "eval_v  validation  succeeded               75.0%     0.7333    12      -        2026-12-02 08:30:00Z",
    ]
    assert render.evaluation_progress_line("eval_x", {"done": 3, "total": None}) == (
        "eval_x: scored 3/? images"
    )
    queued = evaluation("queued")
    assert render.evaluation_queued_line(queued) == (
        "evaluation eval_x queued: model mdl_y on dataset ds_z "
        "(see it: bitserve models evaluations mdl_y)"
    )


def test_an_evaluation_is_polled_into_the_events_follow_reads() -> None:
    answers = iter(
        [
            evaluation("queued"),
            evaluation("running", progress={"done": 0, "total": None}),
            evaluation("running", progress={"done": 0, "total": None}),  # nothing new
            evaluation("running", progress={"done": 8, "total": 12}),
            evaluation(),
        ]
    )
    asked: list[str] = []
    slept: list[float] = []

    def get(evaluation_id: str) -> dict[str, Any]:
        asked.append(evaluation_id)
        return next(answers)

    events = list(
        watch.poll_evaluation(get, evaluation("queued"), interval=0.5, sleep=slept.append)
    )
    assert [(e.event, e.data.get("status", e.data.get("done"))) for e in events] == [
        ("status", "running"),
        ("progress", 0),
        ("progress", 8),
        ("done", "succeeded"),
    ]
    assert events[-1].data == evaluation()
    assert (asked, slept) == (["eval_x"] * 5, [0.5] * 5)
    # Shown as plain lines: the stage when it changes, the count of images scored.
    clock, lines = Clock(), []
    display = watch.PlainLines(watch.EVALUATION, "eval_x", lines.append, clock=clock)
    final = watch.follow(iter(events), evaluation("queued"), display)
    assert final == evaluation()
    assert lines == ["eval_x: queued", "eval_x: running", "eval_x: scored 0/? images"]
    # (8/12 came within 5 s of 0/?: not printed; the summary follows.)
    # A terminal: a live bar counting the images.
    stream = Terminal()
    console = Console(file=stream, force_terminal=True, width=120)
    bar = watch.reporter(watch.EVALUATION, "eval_x", stream, console)
    assert isinstance(bar, watch.LiveBar)
    assert watch.follow(iter(events), evaluation("queued"), bar) == evaluation()
    assert "8/12 images" in stream.getvalue() and "running" in stream.getvalue()


# -- batch predictions -------------------------------------------------------------------------


def batch(status: str = "succeeded", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "bp_x",
        "model_id": "mdl_y",
        "dataset_id": "ds_z",
        "top_k": 5,
        "format": "csv",
        "status": status,
        "progress": {
            "shards_done": 0,
            "shards_total": None,
            "images_done": 0,
            "images_total": None,
        },
        "result": {"rows": 12, "errors": 1, "bytes": 1234, "sha256": "ab"}
        if status == "succeeded"
        else None,
        "error": None,
        "attempts": 1,
        "created_at": "2026-12-02T08:30:00.5Z",
    }
    return {**base, **fields}


def shards(done: int, total: int | None, images: int, images_total: int | None) -> dict[str, Any]:
    return {
        "shards_done": done,
        "shards_total": total,
        "images_done": images,
        "images_total": images_total,
    }


def test_batch_prediction_lines() -> None:
    assert (
        render.batch_progress_line("bp_x", shards(2, 5, 128, 300))
        == "bp_x: shard 2/5, 128/300 images"
    )
    assert (
        render.batch_progress_line("bp_x", shards(0, None, 0, None))
        == "bp_x: shard 0/?, 0/? images"
    )
    assert render.batch_queued_line(batch("queued", format="jsonl", top_k=3)) == (
        "batch prediction bp_x queued: model mdl_y on dataset ds_z, top 3, jsonl "
        "(see it: bitserve models batch-predictions mdl_y)"
    )
    assert render.batch_written_line(batch(), "out/bp_x.csv") == (
        "wrote out/bp_x.csv: 12 rows, 1 error (1.2 kB, batch prediction bp_x)"
    )
    one = batch(result={"rows": 1, "errors": 0, "bytes": 80, "sha256": "ab"})
    assert (
        render.batch_written_line(one, "a.jsonl")
        == "wrote a.jsonl: 1 row (80 B, batch prediction bp_x)"
    )
    many = batch(result={"rows": 30, "errors": 2, "bytes": 2000, "sha256": "ab"})
    assert render.batch_written_line(many, "b.csv") == (
        "wrote b.csv: 30 rows, 2 errors (2.0 kB, batch prediction bp_x)"
    )


def test_batch_predictions_table() -> None:
    items = [
        batch("running", id="bp_r", progress=shards(2, 5, 128, 300)),
        batch("cancelling", id="bp_c", progress=shards(1, 5, 64, 300)),
        batch("queued", id="bp_q", format="jsonl", top_k=1),
        batch(
            "failed", id="bp_f", dataset_id=None, error={"code": "dataset_failed", "message": "m"}
        ),
        batch(),
    ]
    assert rendered(render.batch_predictions_table(items)) == [
        "ID    STATUS                  FORMAT  TOP-K  ROWS  ERRORS  DATASET  CREATED",
        "bp_r  running 2/5 shards      csv     5      -     -       ds_z     2026-12-02 08:30:00Z",
        "bp_c  cancelling 1/5 shards   csv     5      -     -       ds_z     2026-12-02 08:30:00Z",
        "bp_q  queued                  jsonl   1      -     -       ds_z     2026-12-02 08:30:00Z",
        "bp_f  failed: dataset_failed  csv     5      -     -       -        2026-12-02 08:30:00Z",
        "bp_x  succeeded               csv     5      12    1       ds_z     2026-12-02 08:30:00Z",
    ]


def test_a_batch_prediction_is_polled_and_shown_by_shards_and_images() -> None:
    answers = iter(
        [
            batch("running"),
            batch("running", progress=shards(1, 3, 64, 150)),
            batch("cancelling", progress=shards(2, 3, 128, 150)),
            batch("cancelled", progress=shards(2, 3, 128, 150), result=None),
        ]
    )
    slept: list[float] = []
    events = list(
        watch.poll_evaluation(
            lambda _: next(answers), batch("queued"), sleep=slept.append, ended=watch.BATCH_ENDED
        )
    )
    assert [(e.event, e.data.get("status", e.data.get("images_done"))) for e in events] == [
        ("status", "running"),
        ("progress", 64),
        ("status", "cancelling"),
        ("progress", 128),
        ("done", "cancelled"),
    ]
    assert slept == [watch.EVALUATION_POLL_S] * 4
    clock, lines = Clock(), []
    display = watch.PlainLines(watch.BATCH, "bp_x", lines.append, clock=clock, interval=0)
    final = watch.follow(iter(events), batch("queued"), display)
    assert final["status"] == "cancelled"
    assert lines == [
        "bp_x: queued",
        "bp_x: running",
        "bp_x: shard 1/3, 64/150 images",
        "bp_x: cancelling",
        "bp_x: shard 2/3, 128/150 images",
    ]
    stream = Terminal()
    console = Console(file=stream, force_terminal=True, width=120)
    bar = watch.reporter(watch.BATCH, "bp_x", stream, console)
    assert isinstance(bar, watch.LiveBar)
    watch.follow(iter(events[:2]), batch("queued"), bar)
    assert "64/150 images" in stream.getvalue() and "shard 1/3" in stream.getvalue()


# -- --set -------------------------------------------------------------------------------------


def test_parse_override() -> None:
    assert parse_override("steps=200") == ("steps", 200)
    assert parse_override(" base_lr = 0.003 ") == ("base_lr", 0.003)
    assert parse_override("mixup_alpha=1e-1") == ("mixup_alpha", 0.1)
    for text, reason in [
        ("steps", "expected KEY=VALUE, got 'steps'"),
        ("=3", "expected KEY=VALUE, got '=3'"),
        ("steps=ten", "the value of steps must be a number, got 'ten'"),
    ]:
        with pytest.raises(ValueError) as caught:
            parse_override(text)
        assert str(caught.value) == reason


# -- following -----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


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


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


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


# -- output --------------------------------------------------------------------------------------


def test_json_goes_alone_to_stdout_and_notes_to_stderr() -> None:
    out, err = io.StringIO(), io.StringIO()
    remote = Remote("http://x", None, True, out=out, err=err)
    remote.note("uploading x.zip")
    remote.emit([{"id": "ds_x", "name": "ü"}], lambda: "not shown")
    assert json.loads(out.getvalue()) == [{"id": "ds_x", "name": "ü"}]
    assert err.getvalue() == "uploading x.zip\n"

    out, err = io.StringIO(), io.StringIO()
    people = Remote("http://x", None, False, out=out, err=err)
    people.note("uploading x.zip")
    people.emit({"id": "ds_x"}, lambda: "deleted ds_x")
    assert (out.getvalue(), err.getvalue()) == ("uploading x.zip\ndeleted ds_x\n", "")


def test_predict_requests_are_batched(tmp_path: Path) -> None:
    paths = []
    for i in range(PREDICT_BATCH_IMAGES + 3):
        path = tmp_path / f"{i}.png"
        path.write_bytes(b"x" * 10)
        paths.append(path)
    assert [len(b) for b in batches(paths)] == [PREDICT_BATCH_IMAGES, 3]
    assert [p for b in batches(paths) for p in b] == paths


# -- the command line, in process --------------------------------------------------------------


NOT_ANSWERING = (
    "bitserve: the bitserve server at {} is not answering; start it with `bitserve up` (or "
    "`docker compose up`), or point BITSERVE_URL / --url at a running one\n"
)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def closed_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_service_that_is_not_running_is_one_line_and_exit_1(
    closed_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITSERVE_URL", closed_url)
    assert main(["models", "list", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == NOT_ANSWERING.format(closed_url)
    # --url wins over the environment; the entry point hands the command over.
    assert service_cli.main(["jobs", "show", "job_x", "--url", closed_url + "/"]) == 1
    assert capsys.readouterr().err == NOT_ANSWERING.format(closed_url)


def test_a_service_that_is_not_running_is_one_line_on_stderr_from_a_fresh_process(
    closed_url: str, tmp_path: Path
) -> None:
    # The client's retries back off before it gives up; the program then prints one line.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITSERVE_")}
    env.update(BITSERVE_URL=closed_url, BITSERVE_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "bitserve_client.cli", "jobs", "list"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        1,
        "",
        NOT_ANSWERING.format(closed_url),
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["jobs", "create", "--dataset", "ds_x"], "Missing option '--base-model'"),
        (
            ["jobs", "create", "--dataset", "d", "--base-model", "m", "--set", "steps=x"],
            "Invalid value for '--set': the value of steps must be a number, got 'x'",
        ),
        (["jobs", "list", "--status", "done"], "Invalid value for '--status'"),
        (["models", "export", "mdl_x", "--format", "pt"], "Invalid value for '--format'"),
        (["predict", "mdl_x"], "Missing argument 'IMAGE...'"),
        (["models", "evaluate", "mdl_x"], "Missing argument 'DATASET|DIR|ARCHIVE'"),
        (
            ["models", "evaluate", "mdl_x", "photos/held-out"],
            "Invalid value for DATASET|DIR|ARCHIVE: no such folder or archive: photos/held-out",
        ),
        (
            ["models", "evaluate", "mdl_x", "held-out.zip"],
            "no such folder or archive: held-out.zip",
        ),
        (
            ["models", "batch-predict", "mdl_x", "ds_y", "--top-k", "0"],
            "Invalid value for '--top-k'",
        ),
        (
            ["models", "batch-predict", "mdl_x", "ds_y", "--format", "parquet"],
            "Invalid value for '--format'",
        ),
        (
            ["models", "batch-predict", "mdl_x", "ds_y", "-o", "/no/such/folder/p.csv"],
            "Invalid value for -o/--output: no such folder: /no/such/folder",
        ),
        (
            ["models", "batch-predict", "mdl_x", "photos/unlabelled"],
            "no such folder or archive: photos/unlabelled",
        ),
        (["predict", "mdl_x", "/no/such.png"], "'/no/such.png' does not exist"),
        (["datasets", "upload", "/no/such/folder"], "'/no/such/folder' does not exist"),
        (["datasets", "list", "--limit", "-1"], "Invalid value for '--limit'"),
        (
            ["models", "list", "--url", "localhost:8000"],
            "Invalid value for '--url' / BITSERVE_URL: 'localhost:8000' is no http:// or "
            "https:// URL",
        ),
    ],
)
def test_usage_errors_exit_2_before_any_request(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], closed_url: str
) -> None:
    assert main(argv if "--url" in argv else [*argv, "--url", closed_url]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err
    assert "not answering" not in captured.err


def test_an_empty_folder_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], closed_url: str
) -> None:
    assert main(["datasets", "upload", str(tmp_path), "--url", closed_url]) == 2
    assert "has no files to upload" in capsys.readouterr().err
    assert main(["models", "evaluate", "mdl_x", str(tmp_path), "--url", closed_url]) == 2
    err = capsys.readouterr().err
    assert "Invalid value for DATASET|DIR|ARCHIVE" in err and "has no files to upload" in err


def test_export_to_a_missing_folder_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], closed_url: str
) -> None:
    target = tmp_path / "missing" / "m.zip"
    assert main(["models", "export", "mdl_x", "-o", str(target), "--url", closed_url]) == 2
    assert f"no such folder: {target.parent}" in capsys.readouterr().err


def test_the_entry_point_lists_and_dispatches_the_remote_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert tuple(service_cli.REMOTE_COMMANDS) == COMMANDS
    with pytest.raises(SystemExit):
        service_cli.main(["--help"])
    listed = capsys.readouterr().out
    for name in ("up", "api", "worker", *COMMANDS):
        # argparse puts the help of a name as long as "deployments" on the next line
        assert f"\n    {name} " in listed or f"\n    {name}\n" in listed
    assert service_cli.main(["jobs", "--help"]) == 0
    assert "Usage: bitserve jobs [OPTIONS] COMMAND" in capsys.readouterr().out
