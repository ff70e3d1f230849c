"""`bitserve models list|show|export|delete|evaluate|evaluations|batch-predict|
batch-predictions` and `bitserve predict`.

A new models subcommand is one more function here: `@models.command()` + `@remote_command`,
calling the client's method and passing the API's answer to `remote.emit(answer, lambda: <a
table from render>)`; nothing else changes.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Group, RenderableType
from rich.text import Text

from bitserve_client.cli import render, watch
from bitserve_client.cli.datasets import send_dataset
from bitserve_client.cli.remote import Remote, console_for, limit_option, newest, remote_command
from bitserve_client.errors import BatchPredictionFailed, DatasetFailed, EvaluationFailed
from bitserve_client.schema import Label

# --format -> (the API's artifact format, the file's extension)
EXPORT_FORMATS = {
    "zip": ("safetensors", "zip"),
    "safetensors": ("safetensors", "safetensors"),
    "onnx": ("onnx", "onnx"),
}
WEIGHTS_MEMBER = "model.safetensors"  # in the artifact .zip, next to metadata.json
# What one predict request carries at most: below the service's default limits (64 images,
# 64 MiB per request), so a long list of files goes in several requests.
PREDICT_BATCH_IMAGES = 32
PREDICT_BATCH_BYTES = 32 * 1024 * 1024


@click.group()
def models() -> None:
    """List, show, export, evaluate and delete trained models; label datasets with them."""


@models.command("list")
@limit_option
@remote_command
def list_(remote: Remote, limit: int) -> None:
    """List models, newest first."""
    items = newest(lambda size: remote.client.list_models(page_size=size), limit)
    remote.emit(items, lambda: render.models_table(items))


@models.command()
@click.argument("model_id", metavar="ID")
@remote_command
def show(remote: Remote, model_id: str) -> None:
    """Show a model: classes, validation accuracy and per-class figures, precision."""
    model = remote.client.get_model(model_id)

    def view() -> RenderableType:
        parts: list[RenderableType] = [render.details_table(render.model_rows(model))]
        per_class = render.per_class_table(model)
        if per_class is not None:
            parts += ["", per_class]
        return Group(*parts)

    remote.emit(model, view)


@models.command()
@click.argument("model_id", metavar="ID")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(list(EXPORT_FORMATS)),
    default="zip",
    show_default=True,
    help="zip: the weights (safetensors) and metadata.json (classes, preprocessing); "
    "safetensors: the weights file alone; onnx: an ONNX graph.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="File to write, or a folder to write ID.EXT in (default: ./ID.EXT).",
)
@remote_command
def export(remote: Remote, model_id: str, fmt: str, output: Path | None) -> None:
    """Download a model to a file."""
    api_format, extension = EXPORT_FORMATS[fmt]
    target = output if output is not None else Path()
    if target.is_dir():
        target = target / f"{model_id}.{extension}"
    if not target.parent.is_dir():
        raise click.BadParameter(f"no such folder: {target.parent}", param_hint="-o/--output")
    if fmt == "safetensors":
        _weights_only(remote, model_id, target)
    else:
        remote.client.download_artifact(model_id, target, format=api_format)
    size = target.stat().st_size
    result = {"model_id": model_id, "format": fmt, "path": str(target), "bytes": size}
    remote.emit(result, lambda: f"wrote {target} ({render.fmt_bytes(size)})")


def _weights_only(remote: Remote, model_id: str, target: Path) -> None:
    """The artifact .zip's model.safetensors, written to `target` once complete."""
    with tempfile.TemporaryDirectory(prefix="bitserve-export-", dir=target.parent) as tmp:
        archive = remote.client.download_artifact(model_id, Path(tmp) / "artifact.zip")
        partial = Path(tmp) / WEIGHTS_MEMBER
        with (
            zipfile.ZipFile(archive) as zf,
            zf.open(WEIGHTS_MEMBER) as src,
            partial.open("wb") as out,
        ):
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.replace(partial, target)


@models.command()
@click.argument("model_id", metavar="ID")
@remote_command
def delete(remote: Remote, model_id: str) -> None:
    """Delete a model (and stop serving it)."""
    remote.client.delete_model(model_id)
    remote.emit({"id": model_id, "deleted": True}, lambda: f"deleted {model_id}")


@models.command()
@click.argument("model_id", metavar="MODEL")
@click.argument("target", metavar="DATASET|DIR|ARCHIVE")
@click.option("--name", help="The name of a dataset uploaded for it (default: the folder's).")
@click.option(
    "--no-wait", is_flag=True, help="Return once the evaluation is queued; do not wait for it."
)
@remote_command
def evaluate(remote: Remote, model_id: str, target: str, name: str | None, no_wait: bool) -> None:
    """Score a model on labelled images it was not trained on.

    DATASET|DIR|ARCHIVE is a dataset's id, or a folder of <class>/<image> folders (or a
    .zip/.tar.gz of one) to upload first; its classes must be named like the model's. Waits
    for the evaluation (its progress on stderr), then prints accuracy, macro-F1, top-3
    accuracy and the most confused pairs; exit status 1 if it failed.
    """
    dataset_id = _dataset_for(remote, target, name, wait=not no_wait)
    evaluation: dict[str, Any] = dict(remote.client.evaluate_model(model_id, dataset_id))
    if no_wait:
        remote.emit(evaluation, lambda: render.evaluation_queued_line(evaluation))
        return
    final = _follow_evaluation(remote, evaluation)
    if final.get("status") != "succeeded":
        remote.emit(final)  # --json: the failed evaluation, as the API shows it
        raise EvaluationFailed(final)

    def view() -> RenderableType | str:
        if not remote.out.isatty():
            return "\n".join(render.evaluation_lines(final))
        confused = render.confused_table(final.get("result") or {})
        figures = render.details_table(render.evaluation_figures(final))
        return Group(figures, "", confused if confused is not None else "most confused: none")

    remote.emit(final, view)
    if remote.as_json:
        remote.note(render.evaluation_summary(final))


def _dataset_for(
    remote: Remote, target: str, name: str | None, *, wait: bool, what: str = "evaluation"
) -> str:
    """The dataset to evaluate (or batch-predict) on: `target` uploaded (a folder or an archive that exists here),
    else `target` as a dataset id. Uploading says what it does on stderr."""
    path = Path(target)
    if not path.exists():
        # Ids have neither a slash nor an extension: this was meant as a path, mistyped.
        if "/" in target or target.endswith((".zip", ".tgz", ".gz")):
            raise click.BadParameter(
                f"no such folder or archive: {target}", param_hint="DATASET|DIR|ARCHIVE"
            )
        return target
    dataset = send_dataset(
        remote, path, name, wait=wait, stream=remote.err, param_hint="DATASET|DIR|ARCHIVE"
    )
    if dataset.get("status") == "failed":
        raise DatasetFailed(dataset)
    remote.note(
        render.dataset_summary(dataset)
        if dataset.get("status") == "ready"
        else f"dataset {dataset['id']} processing (the {what} waits for it)",
        stderr=True,
    )
    return str(dataset["id"])


def _follow_evaluation(remote: Remote, evaluation: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's progress on stderr until it ends; the ended evaluation. Ctrl-C stops
    waiting only (exit status 130): the evaluation goes on."""
    evaluation_id = evaluation["id"]
    display = watch.reporter(watch.EVALUATION, evaluation_id, remote.err, console_for(remote.err))
    events = watch.poll_evaluation(remote.client.get_evaluation, evaluation)
    try:
        return watch.follow(events, evaluation, display)
    except KeyboardInterrupt:
        remote.note(
            f"stopped waiting; evaluation {evaluation_id} goes on (bitserve models "
            f"evaluations {evaluation['model_id']})",
            stderr=True,
        )
        click.get_current_context().exit(130)


@models.command()
@click.argument("model_id", metavar="MODEL")
@limit_option
@remote_command
def evaluations(remote: Remote, model_id: str, limit: int) -> None:
    """List a model's evaluations, newest first (its fine-tune's validation result last)."""
    items = newest(lambda size: remote.client.list_evaluations(model_id, page_size=size), limit)
    remote.emit(items, lambda: render.evaluations_table(items))


@models.command("batch-predict")
@click.argument("model_id", metavar="MODEL")
@click.argument("target", metavar="DATASET|DIR|ARCHIVE")
@click.option(
    "--top-k",
    default=5,
    show_default=True,
    type=click.IntRange(1, 1000),
    metavar="K",
    help="Labels per file, most probable first (at most the model's classes).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default="csv",
    show_default=True,
    help="csv: file,label_1,score_1,...,error; jsonl: one {file, predictions} per line.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="File to write, or a folder to write ID.FORMAT in (default: ./ID.FORMAT).",
)
@click.option("--name", help="The name of a dataset uploaded for it (default: the folder's).")
@click.option(
    "--no-wait",
    is_flag=True,
    help="Return once the batch prediction is queued; do not wait for it nor download it.",
)
@remote_command
def batch_predict(
    remote: Remote,
    model_id: str,
    target: str,
    top_k: int,
    fmt: str,
    output: Path | None,
    name: str | None,
    no_wait: bool,
) -> None:
    """Predict every file of a dataset with a model, into one CSV or JSONL file.

    DATASET|DIR|ARCHIVE is a dataset's id, or a folder (or a .zip/.tar.gz of one) to upload
    first; its class folders are ignored (every image is predicted). Waits for the batch
    prediction (shards and images done on stderr), downloads its output, then prints the file
    written and its row count; exit status 1 if it failed or was cancelled.
    """
    chosen = output if output is not None else Path()
    if not chosen.is_dir() and not chosen.parent.is_dir():
        # Checked before anything is uploaded or queued: a typo costs nothing.
        raise click.BadParameter(f"no such folder: {chosen.parent}", param_hint="-o/--output")
    dataset_id = _dataset_for(remote, target, name, wait=not no_wait, what="batch prediction")
    batch: dict[str, Any] = dict(
        remote.client.create_batch_prediction(model_id, dataset_id, top_k=top_k, format=fmt)
    )
    if no_wait:
        remote.emit(batch, lambda: render.batch_queued_line(batch))
        return
    final = _follow_batch(remote, batch)
    if final.get("status") != "succeeded":
        remote.emit(final)  # --json: the failed (or cancelled) one, as the API shows it
        raise BatchPredictionFailed(final)
    path = chosen / f"{final['id']}.{fmt}" if chosen.is_dir() else chosen
    written = remote.client.download_batch_predictions(str(final["id"]), path)
    line = render.batch_written_line(final, str(written))
    # Text: a path is shown as it is, never read as rich markup ("out[1].csv").
    remote.emit({**final, "path": str(written)}, lambda: Text(line))
    if remote.as_json:
        remote.note(line)


def _follow_batch(remote: Remote, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch prediction's progress on stderr until it ends; the ended one. Ctrl-C stops
    waiting only (exit status 130): the batch prediction goes on."""
    batch_id = batch["id"]
    display = watch.reporter(watch.BATCH, batch_id, remote.err, console_for(remote.err))
    events = watch.poll_evaluation(
        remote.client.get_batch_prediction, batch, ended=watch.BATCH_ENDED
    )
    try:
        return watch.follow(events, batch, display)
    except KeyboardInterrupt:
        remote.note(
            f"stopped waiting; batch prediction {batch_id} goes on (bitserve models "
            f"batch-predictions {batch['model_id']})",
            stderr=True,
        )
        click.get_current_context().exit(130)


@models.command("batch-predictions")
@click.argument("model_id", metavar="MODEL")
@limit_option
@remote_command
def batch_predictions(remote: Remote, model_id: str, limit: int) -> None:
    """List a model's batch predictions, newest first."""
    items = newest(
        lambda size: remote.client.list_batch_predictions(model_id, page_size=size), limit
    )
    remote.emit(items, lambda: render.batch_predictions_table(items))


@click.command()
@click.argument("model_id", metavar="MODEL")
@click.argument(
    "images",
    metavar="IMAGE...",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "--top-k",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    metavar="K",
    help="Labels per image, most probable first.",
)
@remote_command
def predict(remote: Remote, model_id: str, images: tuple[Path, ...], top_k: int) -> None:
    """Classify images with a model: one line per image (file, label, score)."""
    ranked: list[list[Label]] = []
    for batch in batches(images):
        ranked += remote.client.predict(model_id, batch, top_k=top_k)
    answer: dict[str, Any] = {
        "model_id": model_id,
        "predictions": [{"top_k": labels} for labels in ranked],
    }
    remote.emit(answer, lambda: render.predictions_table([str(p) for p in images], ranked))


def batches(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """The files in order, in requests of at most PREDICT_BATCH_IMAGES images and (unless one
    file alone is larger) PREDICT_BATCH_BYTES bytes."""
    batch: list[Path] = []
    size = 0
    for path in paths:
        length = path.stat().st_size
        if batch and (len(batch) == PREDICT_BATCH_IMAGES or size + length > PREDICT_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(path)
        size += length
    if batch:
        yield batch
