"""`bitserve models list|show|export|delete` and `bitserve predict`.

A new models subcommand (`evaluate`, once the API has it) is one more function here:
`@models.command()` + `@remote_command`, calling the client's method and passing the API's
answer to `remote.emit(answer, lambda: <a table from render>)`; nothing else changes.
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

from bitserve_client.cli import render
from bitserve_client.cli.remote import Remote, limit_option, newest, remote_command
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
    """List, show, export and delete trained models."""


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
