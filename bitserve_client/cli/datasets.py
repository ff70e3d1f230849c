"""`bitserve datasets upload|list|show|delete`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import IO, Any

import click

from bitserve_client.cli import render, watch
from bitserve_client.cli.remote import (
    Remote,
    console_for,
    limit_option,
    newest,
    remote_command,
)
from bitserve_client.errors import DatasetFailed
from bitserve_client.files import zip_folder


@click.group()
def datasets() -> None:
    """Upload, list, show and delete datasets (folders of class folders of images)."""


@datasets.command()
@click.argument("source", metavar="DIR|ARCHIVE", type=click.Path(exists=True, path_type=Path))
@click.option("--name", help="The dataset's name (default: the folder's or archive's name).")
@click.option("--no-wait", is_flag=True, help="Return once uploaded; do not wait for ingestion.")
@remote_command
def upload(remote: Remote, source: Path, name: str | None, no_wait: bool) -> None:
    """Upload a folder of <class>/<image> folders (zipped first) or a .zip/.tar.gz of one.

    Waits until the service has checked every image (the dataset is ready, or failed with the
    reason), showing its progress; exit status 1 if it failed.
    """
    dataset = send_dataset(remote, source, name, wait=not no_wait, stream=remote.human)
    remote.emit(dataset)
    if dataset.get("status") == "failed":
        raise DatasetFailed(dataset)
    remote.note(
        render.dataset_summary(dataset)
        if dataset.get("status") != "processing"
        else f"dataset {dataset['id']} processing (follow it: bitserve datasets show {dataset['id']})"
    )


def send_dataset(
    remote: Remote,
    source: Path,
    name: str | None,
    *,
    wait: bool,
    stream: IO[str],
    param_hint: str = "DIR|ARCHIVE",
) -> dict[str, Any]:
    """Upload `source` (a folder is zipped first) and, with `wait`, follow its ingestion to its
    end; the dataset as it is then. What it is doing goes to `stream` (`models evaluate` sends
    it to stderr: its stdout is for the evaluation's summary)."""

    def note(line: str) -> None:
        stream.write(line + "\n")
        stream.flush()

    with tempfile.TemporaryDirectory(prefix="bitserve-upload-") as tmp:
        archive = source
        if source.is_dir():
            # Named after the folder: the service names the dataset after the file.
            archive = Path(tmp) / f"{source.resolve().name or 'dataset'}.zip"
            note(f"zipping {source}")
            try:
                zip_folder(source, archive)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=param_hint) from None
        note(f"uploading {archive.name} ({render.fmt_bytes(archive.stat().st_size)})")
        dataset: dict[str, Any] = dict(remote.client.upload_dataset(archive, name, wait=False))
    if wait and dataset.get("status") == "processing":
        display = watch.reporter(watch.DATASET, dataset["id"], stream, console_for(stream))
        events = remote.client.watch_dataset(dataset["id"])
        dataset = watch.follow(events, dataset, display)
    return dataset


@datasets.command("list")
@limit_option
@remote_command
def list_(remote: Remote, limit: int) -> None:
    """List datasets, newest first."""
    items = newest(lambda size: remote.client.list_datasets(page_size=size), limit)
    remote.emit(items, lambda: render.datasets_table(items))


@datasets.command()
@click.argument("dataset_id", metavar="ID")
@remote_command
def show(remote: Remote, dataset_id: str) -> None:
    """Show a dataset: status, classes, rejected files."""
    dataset = remote.client.get_dataset(dataset_id)
    remote.emit(dataset, lambda: render.details_table(render.dataset_rows(dataset)))


@datasets.command()
@click.argument("dataset_id", metavar="ID")
@remote_command
def delete(remote: Remote, dataset_id: str) -> None:
    """Delete a dataset (refused while a job uses it)."""
    remote.client.delete_dataset(dataset_id)
    remote.emit({"id": dataset_id, "deleted": True}, lambda: f"deleted {dataset_id}")
