"""What the CLI prints for people: one-line summaries, progress lines and tables.

Pure functions of the API's objects (docs/api.md), so they are tested without a server. The
tables are rich Tables without borders (columns split by spaces, like `docker ps`), so their
lines can still be read by grep and awk; `--json` is the format for programs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

FINISHED = ("succeeded", "failed", "cancelled")


# -- numbers ---------------------------------------------------------------------------------


def fmt_bytes(count: int | None) -> str:
    """Decimal units, as disks and downloads are sized: 1234567 -> "1.2 MB"."""
    if count is None:
        return "?"
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def fmt_duration(seconds: float | None) -> str:
    """45 -> "45s", 185 -> "3m05s", 3725 -> "1h02m"; None -> "?"."""
    if seconds is None:
        return "?"
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_score(score: float) -> str:
    return f"{score:.4f}"


def fmt_percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f}%"


def fmt_time(stamp: str | None) -> str:
    """An API time to the second: "2026-12-02T08:30:00.123456Z" -> "2026-12-02 08:30:00Z"."""
    if not stamp:
        return "-"
    return stamp[:19].replace("T", " ") + "Z"


# -- jobs ------------------------------------------------------------------------------------


def job_stage(status: str | None, phase: str | None) -> str:
    """What a job is doing, in one word: its status, or while running its progress phase
    (downloading, preparing, training, evaluating, done; none yet before the worker reports)."""
    if status == "running":
        return phase or "running"
    return status or "unknown"


def job_progress_details(progress: Mapping[str, Any], *, live: bool = True) -> str:
    """The figures the worker has reported, e.g. "loss 0.6931, 52.3 images/s, ETA 4s"; only
    the loss once training is over (not `live`, or phase done): speed and ETA are stale then."""
    parts = []
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if not live or progress.get("phase") == "done":
        return ", ".join(parts)
    if progress.get("images_per_second") is not None:
        parts.append(f"{progress['images_per_second']:.1f} images/s")
    if progress.get("eta_seconds") is not None:
        parts.append(f"ETA {fmt_duration(progress['eta_seconds'])}")
    return ", ".join(parts)


def job_progress_line(job_id: str, progress: Mapping[str, Any], *, live: bool = True) -> str:
    """One progress line of a job: its checkpoint download, or its step and figures."""
    if progress.get("phase") == "downloading":
        done, total = progress.get("downloaded_bytes"), progress.get("total_bytes")
        return f"{job_id}: downloading the base checkpoint, {fmt_bytes(done)} of {fmt_bytes(total)}"
    parts = [f"step {progress.get('step', 0)}/{progress.get('total_steps', '?')}"]
    details = job_progress_details(progress, live=live)
    return f"{job_id}: {', '.join([*parts, details] if details else parts)}"


def job_summary(job: Mapping[str, Any]) -> str:
    """The one line `jobs create --watch` ends with: status, steps, final loss, and the
    accuracy and model of a job that succeeded or the error of one that failed."""
    progress = job.get("progress") or {}
    status = job.get("status", "unknown")
    parts = [f"{progress.get('step', 0)}/{progress.get('total_steps', '?')} steps"]
    if progress.get("loss") is not None:
        parts.append(f"final loss {progress['loss']:.4f}")
    if status == "succeeded":
        accuracy = (job.get("metrics") or {}).get("accuracy")
        parts.append(
            "no validation accuracy (no validation split)"
            if accuracy is None
            else f"accuracy {fmt_percent(accuracy)}"
        )
        parts.append(f"model {job.get('model_id')}")
    error = job.get("error")
    if error:
        parts.append(f"error {error.get('code')}: {error.get('message')}")
    return f"job {job.get('id')} {status}: {', '.join(parts)}"


def job_created_line(job: Mapping[str, Any]) -> str:
    plan = job.get("plan") or {}
    return (
        f"job {job.get('id')} {job.get('status')}: {job.get('base_model')} on dataset "
        f"{job.get('dataset_id')}, {plan.get('total_steps', '?')} steps "
        f"(follow it: bitserve jobs watch {job.get('id')})"
    )


# -- datasets --------------------------------------------------------------------------------


def dataset_progress_line(dataset_id: str, progress: Mapping[str, Any]) -> str:
    """A dataset's phase, with the count of archive members or images when known, e.g.
    "ds_x: indexing 120/400"."""
    phase = progress.get("phase") or "processing"
    done, total = progress.get("done"), progress.get("total")
    if done is None:
        return f"{dataset_id}: {phase}"
    return f"{dataset_id}: {phase} {done}/{total if total is not None else '?'}"


def dataset_summary(dataset: Mapping[str, Any]) -> str:
    """The line `datasets upload` ends with, e.g. "dataset ds_x ready: 40 images in 2 classes
    (pets), 1 file rejected (unsupported_format 1)", or the error of a failed one."""
    status = dataset.get("status")
    head = f"dataset {dataset.get('id')} {status}"
    if status != "ready":
        error = dataset.get("error") or {}
        if error:
            return f"{head}: {error.get('code')}: {error.get('message')}"
        return head
    text = (
        f"{head}: {dataset.get('num_images')} images in {dataset.get('num_classes')} classes "
        f"({dataset.get('name')})"
    )
    rejected = dataset.get("rejected_count") or 0
    if rejected:
        reasons = ", ".join(
            f"{reason} {count}" for reason, count in (dataset.get("rejected_reasons") or {}).items()
        )
        text += f", {rejected} file{'s' if rejected != 1 else ''} rejected ({reasons})"
    return text


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


# -- tables ----------------------------------------------------------------------------------


def table(*columns: str) -> Table:
    """A borderless table; cells are added as Text, never parsed as rich markup (a dataset
    may be named "[bold]x")."""
    grid = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in columns:
        grid.add_column(column, no_wrap=True, overflow="fold")
    return grid


def add_row(grid: Table, *cells: object) -> None:
    grid.add_row(*(Text("-" if cell is None else str(cell)) for cell in cells))


def datasets_table(items: Iterable[Mapping[str, Any]]) -> Table:
    grid = table("ID", "NAME", "STATUS", "IMAGES", "CLASSES", "SIZE", "CREATED")
    for d in items:
        status = d.get("status")
        if status == "processing" and d.get("progress"):
            status = f"processing ({d['progress'].get('phase')})"
        add_row(
            grid,
            d.get("id"),
            d.get("name"),
            status,
            d.get("num_images"),
            d.get("num_classes"),
            fmt_bytes(d.get("bytes")),
            fmt_time(d.get("created_at")),
        )
    return grid


def jobs_table(items: Iterable[Mapping[str, Any]]) -> Table:
    grid = table("ID", "NAME", "STATUS", "BASE MODEL", "STEPS", "LOSS", "MODEL", "CREATED")
    for j in items:
        progress = j.get("progress") or {}
        loss = progress.get("loss")
        add_row(
            grid,
            j.get("id"),
            j.get("name"),
            job_stage(j.get("status"), progress.get("phase")),
            j.get("base_model"),
            f"{progress.get('step', 0)}/{progress.get('total_steps', '?')}",
            None if loss is None else f"{loss:.4f}",
            j.get("model_id"),
            fmt_time(j.get("created_at")),
        )
    return grid


def models_table(items: Iterable[Mapping[str, Any]]) -> Table:
    grid = table("ID", "NAME", "BASE MODEL", "CLASSES", "ACCURACY", "JOB", "CREATED")
    for m in items:
        add_row(
            grid,
            m.get("id"),
            m.get("name"),
            m.get("base_model"),
            len(m.get("classes") or []),
            fmt_percent((m.get("metrics") or {}).get("accuracy")),
            m.get("job_id"),
            fmt_time(m.get("created_at")),
        )
    return grid


def details_table(rows: Sequence[tuple[str, object]]) -> Table:
    """`show`: one "field  value" line per row."""
    grid = Table(box=None, pad_edge=False, show_edge=False, show_header=False)
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(Text(key), Text("-" if value is None else str(value)))
    return grid


def dataset_rows(d: Mapping[str, Any]) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [
        ("id", d.get("id")),
        ("name", d.get("name")),
        ("status", d.get("status")),
    ]
    if d.get("progress"):
        rows.append(("progress", dataset_progress_line(str(d.get("id")), d["progress"])))
    if d.get("error"):
        rows.append(("error", f"{d['error'].get('code')}: {d['error'].get('message')}"))
    size = d.get("image_size") or {}
    rows += [
        ("images", d.get("num_images")),
        (
            "classes",
            ", ".join(f"{c['name']} ({c['count']})" for c in d.get("classes") or []) or None,
        ),
        (
            "median size",
            f"{size['median_width']}x{size['median_height']} px" if size else None,
        ),
        ("rejected", _rejected(d)),
        ("archive", fmt_bytes(d.get("bytes"))),
        ("created", fmt_time(d.get("created_at"))),
        ("finished", fmt_time(d.get("finished_at"))),
    ]
    return rows


def _rejected(d: Mapping[str, Any]) -> str:
    count = d.get("rejected_count") or 0
    if not count:
        return "0"
    reasons = ", ".join(f"{r} {n}" for r, n in (d.get("rejected_reasons") or {}).items())
    return f"{count} ({reasons})"


def job_rows(j: Mapping[str, Any]) -> list[tuple[str, object]]:
    progress = j.get("progress") or {}
    plan = j.get("plan") or {}
    metrics = j.get("metrics") or {}
    error = j.get("error")
    overrides = ", ".join(f"{k}={v}" for k, v in (j.get("overrides") or {}).items())
    return [
        ("id", j.get("id")),
        ("name", j.get("name")),
        ("status", job_stage(j.get("status"), progress.get("phase"))),
        ("dataset", j.get("dataset_id")),
        ("base model", j.get("base_model")),
        ("precision", j.get("serving_precision")),
        ("overrides", overrides or None),
        (
            "plan",
            f"{plan.get('total_steps')} steps, batch {plan.get('batch_size')}, "
            f"lr {plan.get('base_lr')}, crop {plan.get('crop')} (precrop {plan.get('precrop')})",
        ),
        ("progress", _job_progress(j)),
        ("attempts", j.get("attempts")),
        ("error", f"{error.get('code')}: {error.get('message')}" if error else None),
        ("model", j.get("model_id")),
        ("accuracy", fmt_percent(metrics.get("accuracy")) if metrics else None),
        ("created", fmt_time(j.get("created_at"))),
        ("started", fmt_time(j.get("started_at"))),
        ("finished", fmt_time(j.get("finished_at"))),
    ]


def _job_progress(j: Mapping[str, Any]) -> str:
    live = j.get("status") in ("running", "cancelling")
    line = job_progress_line(str(j.get("id")), j.get("progress") or {}, live=live)
    return line.split(": ", 1)[1]


def model_rows(m: Mapping[str, Any]) -> list[tuple[str, object]]:
    metrics = m.get("metrics") or {}
    check = metrics.get("precision")
    served = "fp32" if not check else f"{check.get('served')} ({check.get('reason')})"
    spec = m.get("input") or {}
    loss = metrics.get("loss")
    return [
        ("id", m.get("id")),
        ("name", m.get("name")),
        ("job", m.get("job_id")),
        ("base model", m.get("base_model")),
        ("classes", ", ".join(m.get("classes") or [])),
        ("accuracy", fmt_percent(metrics.get("accuracy"))),
        ("macro F1", None if metrics.get("macro_f1") is None else f"{metrics['macro_f1']:.4f}"),
        ("validation", f"{metrics.get('num_examples') or 0} images"),
        ("validation loss", None if loss is None else f"{loss:.4f}"),
        ("served in", served),
        ("input", f"{spec.get('crop')}x{spec.get('crop')} px" if spec else None),
        ("created", fmt_time(m.get("created_at"))),
    ]


def per_class_table(m: Mapping[str, Any]) -> Table | None:
    """The model's validation figures per class (None without a validation split)."""
    per_class = (m.get("metrics") or {}).get("per_class") or []
    if not per_class:
        return None
    grid = table("CLASS", "PRECISION", "RECALL", "F1", "IMAGES")
    for row in per_class:
        add_row(
            grid,
            row["label"],
            f"{row['precision']:.4f}",
            f"{row['recall']:.4f}",
            f"{row['f1']:.4f}",
            row["support"],
        )
    return grid


def predictions_table(files: Sequence[str], ranked: Sequence[Sequence[Mapping[str, Any]]]) -> Table:
    """One line per image: the file, its top label and score, then the runners-up if asked."""
    others = any(len(labels) > 1 for labels in ranked)
    grid = table("FILE", "LABEL", "SCORE", *(["NEXT"] if others else []))
    for name, labels in zip(files, ranked, strict=True):
        top = labels[0]
        rest = ", ".join(f"{x['label']} {fmt_score(x['score'])}" for x in labels[1:])
        add_row(grid, name, top["label"], fmt_score(top["score"]), *([rest] if others else []))
    return grid
