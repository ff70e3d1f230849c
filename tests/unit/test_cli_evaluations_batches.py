"""bitserve_client.cli without a server: evaluations and batch predictions as it prints them
(plain lines, tables, the two tables on a terminal) and followed by polling, by shards and
images. Against a live server: tests/integration/cli_remote/."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from bitserve_client.cli import render, watch
from tests.unit.cli_remote_helpers import Clock, Terminal, rendered

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
