"""What the CLI prints for evaluations, batch predictions and predictions (see
bitserve_client.cli.render, which re-exports these)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.table import Table

from bitserve_client.cli.fmt import add_row, fmt_bytes, fmt_percent, fmt_score, fmt_time, table

# -- evaluations -----------------------------------------------------------------------------


def evaluation_progress_line(evaluation_id: str, progress: Mapping[str, Any]) -> str:
    """ "eval_x: scored 40/120 images" (the total is unknown until the worker has listed the
    dataset)."""
    done, total = progress.get("done") or 0, progress.get("total")
    return f"{evaluation_id}: scored {done}/{total if total is not None else '?'} images"


def evaluation_queued_line(evaluation: Mapping[str, Any]) -> str:
    """What `models evaluate --no-wait` ends with."""
    model_id = evaluation.get("model_id")
    return (
        f"evaluation {evaluation.get('id')} {evaluation.get('status')}: model {model_id} on "
        f"dataset {evaluation.get('dataset_id')} (see it: bitserve models evaluations {model_id})"
    )


def _top3(result: Mapping[str, Any]) -> str:
    """Top-3 accuracy, or why there is none: the validation run scores top-1 only, and a model
    of at most 3 classes has its true label in its top 3 by definition (the API leaves it out)."""
    top_k = result.get("top_k_accuracy")
    if top_k is None:
        return "- (not measured)"
    if "3" not in top_k:
        return f"- (the model has {len(result.get('classes') or [])} classes)"
    return fmt_percent(top_k["3"])


def _images(result: Mapping[str, Any]) -> str:
    skipped = result.get("skipped") or 0
    tail = f" ({skipped} skipped: could not be decoded)" if skipped else ""
    return f"{result.get('num_examples')}{tail}"


def _source(evaluation: Mapping[str, Any]) -> str:
    if evaluation.get("source") == "validation":
        return "the fine-tune's validation images"
    dataset_id = evaluation.get("dataset_id")
    return f"dataset {dataset_id}" if dataset_id else "a deleted dataset"


def evaluation_figures(evaluation: Mapping[str, Any]) -> list[tuple[str, object]]:
    """The figures of an evaluation that succeeded, as (what, value) rows."""
    result = evaluation.get("result") or {}
    loss, macro_f1 = result.get("loss"), result.get("macro_f1")
    return [
        ("evaluation", evaluation.get("id")),
        ("model", evaluation.get("model_id")),
        ("scored on", _source(evaluation)),
        ("images", _images(result)),
        ("accuracy", fmt_percent(result.get("accuracy"))),
        ("macro-F1", None if macro_f1 is None else f"{macro_f1:.4f}"),
        ("top-3 accuracy", _top3(result)),
        ("loss", None if loss is None else f"{loss:.4f}"),
    ]


def confused_text(result: Mapping[str, Any]) -> str:
    """The most confused pairs on one line: "bee -> ant 2, cow -> ant 1" (true -> predicted,
    images), or "none"."""
    pairs = result.get("most_confused") or []
    return ", ".join(f"{p['label']} -> {p['predicted']} {p['count']}" for p in pairs) or "none"


def evaluation_lines(evaluation: Mapping[str, Any]) -> list[str]:
    """An evaluation that succeeded, in plain lines (a pipe, a log): "what: value" each, the
    most confused pairs (true -> predicted, images) last."""
    result = evaluation.get("result") or {}
    rows = [(k, v) for k, v in evaluation_figures(evaluation) if k != "evaluation"]
    return [
        f"evaluation {evaluation.get('id')} {evaluation.get('status')}",
        *(f"{key}: {'-' if value is None else value}" for key, value in rows),
        f"most confused (true -> predicted): {confused_text(result)}",
    ]


def evaluation_summary(evaluation: Mapping[str, Any]) -> str:
    """One line (stderr under --json): "evaluation eval_x succeeded: 12 images, accuracy 83.3%,
    macro-F1 0.8000, top-3 accuracy 100.0%"."""
    figures = dict(evaluation_figures(evaluation))
    result = evaluation.get("result") or {}
    parts = [f"{result.get('num_examples')} images"] + [
        f"{key} {'-' if figures[key] is None else figures[key]}"
        for key in ("accuracy", "macro-F1", "top-3 accuracy")
    ]
    return f"evaluation {evaluation.get('id')} {evaluation.get('status')}: {', '.join(parts)}"


def confused_table(result: Mapping[str, Any]) -> Table | None:
    """The most confused pairs, largest first (None when every image was classified right)."""
    pairs = result.get("most_confused") or []
    if not pairs:
        return None
    grid = table("TRUE LABEL", "PREDICTED", "IMAGES")
    for pair in pairs:
        add_row(grid, pair["label"], pair["predicted"], pair["count"])
    return grid


def evaluation_status(evaluation: Mapping[str, Any]) -> str:
    """ "succeeded", "running 40/120", "failed: unknown_labels"."""
    status = str(evaluation.get("status") or "unknown")
    progress = evaluation.get("progress") or {}
    if status == "running" and progress.get("done") is not None:
        total = progress.get("total")
        return f"running {progress['done']}/{total if total is not None else '?'}"
    if status == "failed":
        return f"failed: {(evaluation.get('error') or {}).get('code') or 'unknown'}"
    return status


def evaluations_table(items: Iterable[Mapping[str, Any]]) -> Table:
    grid = table("ID", "SOURCE", "STATUS", "ACCURACY", "MACRO-F1", "IMAGES", "DATASET", "CREATED")
    for e in items:
        result = e.get("result") or {}
        macro_f1 = result.get("macro_f1")
        add_row(
            grid,
            e.get("id"),
            e.get("source"),
            evaluation_status(e),
            fmt_percent(result.get("accuracy")),
            None if macro_f1 is None else f"{macro_f1:.4f}",
            result.get("num_examples"),
            e.get("dataset_id"),
            fmt_time(e.get("created_at")),
        )
    return grid


# -- batch predictions -----------------------------------------------------------------------


def _of(done: Any, total: Any) -> str:
    return f"{done or 0}/{total if total is not None else '?'}"


def batch_progress_line(batch_id: str, progress: Mapping[str, Any]) -> str:
    """ "bp_x: shard 2/5, 128/300 images" (the totals are unknown until a worker has read the
    dataset)."""
    shards = _of(progress.get("shards_done"), progress.get("shards_total"))
    images = _of(progress.get("images_done"), progress.get("images_total"))
    return f"{batch_id}: shard {shards}, {images} images"


def batch_queued_line(batch: Mapping[str, Any]) -> str:
    """What `models batch-predict --no-wait` ends with."""
    model_id = batch.get("model_id")
    return (
        f"batch prediction {batch.get('id')} {batch.get('status')}: model {model_id} on "
        f"dataset {batch.get('dataset_id')}, top {batch.get('top_k')}, {batch.get('format')} "
        f"(see it: bitserve models batch-predictions {model_id})"
    )


def batch_written_line(batch: Mapping[str, Any], path: str) -> str:
    """The last line of `models batch-predict`: the file written and its row count, e.g.
    "wrote bp_x.csv: 12 rows (1 error), 1.2 kB, batch prediction bp_x"."""
    result = batch.get("result") or {}
    rows, errors = result.get("rows"), result.get("errors") or 0
    error_text = f", {errors} error{'s' if errors != 1 else ''}" if errors else ""
    return (
        f"wrote {path}: {rows} row{'s' if rows != 1 else ''}{error_text} "
        f"({fmt_bytes(result.get('bytes'))}, batch prediction {batch.get('id')})"
    )


def batch_status(batch: Mapping[str, Any]) -> str:
    """ "succeeded", "running 2/5 shards", "failed: dataset_failed"."""
    status = str(batch.get("status") or "unknown")
    progress = batch.get("progress") or {}
    if status in ("running", "cancelling") and progress.get("shards_total") is not None:
        return f"{status} {_of(progress.get('shards_done'), progress['shards_total'])} shards"
    if status == "failed":
        return f"failed: {(batch.get('error') or {}).get('code') or 'unknown'}"
    return status


def batch_predictions_table(items: Iterable[Mapping[str, Any]]) -> Table:
    grid = table("ID", "STATUS", "FORMAT", "TOP-K", "ROWS", "ERRORS", "DATASET", "CREATED")
    for b in items:
        result = b.get("result") or {}
        add_row(
            grid,
            b.get("id"),
            batch_status(b),
            b.get("format"),
            b.get("top_k"),
            result.get("rows"),
            result.get("errors"),
            b.get("dataset_id"),
            fmt_time(b.get("created_at")),
        )
    return grid


# -- predictions -----------------------------------------------------------------------------


def predictions_table(files: Sequence[str], ranked: Sequence[Sequence[Mapping[str, Any]]]) -> Table:
    """One line per image: the file, its top label and score, then the runners-up if asked."""
    others = any(len(labels) > 1 for labels in ranked)
    grid = table("FILE", "LABEL", "SCORE", *(["NEXT"] if others else []))
    for name, labels in zip(files, ranked, strict=True):
        top = labels[0]
        rest = ", ".join(f"{x['label']} {fmt_score(x['score'])}" for x in labels[1:])
        add_row(grid, name, top["label"], fmt_score(top["score"]), *([rest] if others else []))
    return grid
