"""What the CLI prints for people: one-line summaries, progress lines and tables.

Pure functions of the API's objects (docs/api.md), so they are tested without a server. The
tables are rich Tables without borders (columns split by spaces, like `docker ps`), so their
lines can still be read by grep and awk; `--json` is the format for programs.

Datasets, jobs and models are here; evaluations, batch predictions and predictions in
render_scoring, the number formats and table helpers in fmt. This module re-exports both, so
the commands use `render.<name>` for all of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rich.table import Table

from bitserve_client.cli.fmt import (
    FINISHED,
    add_row,
    details_table,
    fmt_bytes,
    fmt_duration,
    fmt_percent,
    fmt_score,
    fmt_time,
    table,
)
from bitserve_client.cli.render_scoring import (
    batch_predictions_table,
    batch_progress_line,
    batch_queued_line,
    batch_status,
    batch_written_line,
    confused_table,
    confused_text,
    evaluation_figures,
    evaluation_lines,
    evaluation_progress_line,
    evaluation_queued_line,
    evaluation_status,
    evaluation_summary,
    evaluations_table,
    predictions_table,
)

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


def deploy_outcome_line(outcome: Mapping[str, Any]) -> str:
    """What a job's --deploy-to did, e.g. "deployment pets: updated (v2): the new model beat
    the current target (accuracy 95.0% vs 90.0%)"."""
    version = f" (v{outcome['version']})" if outcome.get("version") is not None else ""
    line = f"deployment {outcome.get('deployment')}: {outcome.get('action')}{version}: "
    line += str(outcome.get("reason", ""))
    new, old = outcome.get("accuracy"), outcome.get("incumbent_accuracy")
    if new is not None and old is not None:
        line += f" (accuracy {fmt_percent(new)} vs {fmt_percent(old)})"
    return line


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


# -- tables ----------------------------------------------------------------------------------


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


__all__ = [
    "FINISHED",
    "add_row",
    "batch_predictions_table",
    "batch_progress_line",
    "batch_queued_line",
    "batch_status",
    "batch_written_line",
    "confused_table",
    "confused_text",
    "dataset_progress_line",
    "dataset_rows",
    "dataset_summary",
    "datasets_table",
    "details_table",
    "evaluation_figures",
    "evaluation_lines",
    "evaluation_progress_line",
    "evaluation_queued_line",
    "evaluation_status",
    "evaluation_summary",
    "evaluations_table",
    "fmt_bytes",
    "fmt_duration",
    "fmt_percent",
    "fmt_score",
    "fmt_time",
    "job_created_line",
    "job_progress_details",
    "job_progress_line",
    "job_rows",
    "job_stage",
    "job_summary",
    "jobs_table",
    "model_rows",
    "models_table",
    "per_class_table",
    "predictions_table",
    "table",
]
