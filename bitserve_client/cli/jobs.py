"""`bitserve jobs create|list|show|watch|cancel`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import click

from bitserve_client.cli import render, watch
from bitserve_client.cli.remote import Remote, limit_option, newest, remote_command

STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
# The HyperRule fields a job may override (docs/api.md, "Fine-tuning jobs"); the service
# checks names, bounds and types (422), this side only reads KEY=NUMBER.
OVERRIDABLE = (
    "steps",
    "warmup_steps",
    "batch_size",
    "micro_batch_size",
    "base_lr",
    "crop",
    "precrop",
    "mixup_alpha",
)


def parse_override(text: str) -> tuple[str, int | float]:
    """KEY=NUMBER as (key, number): "steps=200" -> ("steps", 200), "base_lr=0.003" ->
    ("base_lr", 0.003); ValueError (with the reason) for anything else."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    for convert in (int, float):
        try:
            return key, convert(raw)
        except ValueError:
            continue
    raise ValueError(f"the value of {key} must be a number, got {raw!r}")


def _overrides(_: click.Context, __: click.Parameter, values: Sequence[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for text in values:
        try:
            key, value = parse_override(text)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        overrides[key] = value
    return overrides


@click.group()
def jobs() -> None:
    """Start fine-tuning jobs, follow them, list, show and cancel them."""


@jobs.command()
@click.option("--dataset", "dataset_id", required=True, metavar="ID", help="A ready dataset.")
@click.option(
    "--base-model",
    required=True,
    metavar="NAME",
    help="What to fine-tune, e.g. BiT-M-R50x1 (tiny-R10x0.25 and small-R26x0.5 train from "
    "scratch, without a checkpoint).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    callback=_overrides,
    metavar="KEY=VALUE",
    help=f"Override the BiT-HyperRule ({', '.join(OVERRIDABLE)}); repeatable.",
)
@click.option(
    "--serving-precision",
    type=click.Choice(["fp32", "int8"]),
    default="fp32",
    show_default=True,
    help="int8: serve quantized if it agrees with fp32 on the validation split.",
)
@click.option(
    "--validation-fraction",
    type=float,
    default=0.1,
    show_default=True,
    help="Share of each class held out to measure the model.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Split and training seed.")
@click.option("--name", help="A name for the job and its model.")
@click.option(
    "--deploy-to",
    metavar="NAME",
    help="A deployment to point at the model when the job succeeds (made if missing).",
)
@click.option(
    "--deploy-if-better",
    is_flag=True,
    help="With --deploy-to: only if the model beats the deployment's current target on the "
    "job's validation split.",
)
@click.option(
    "--watch",
    "follow_job",
    is_flag=True,
    help="Follow the job to its end (exit status 0 if it succeeded, 1 if not).",
)
@remote_command
def create(
    remote: Remote,
    dataset_id: str,
    base_model: str,
    overrides: dict[str, Any],
    serving_precision: str,
    validation_fraction: float,
    seed: int,
    name: str | None,
    deploy_to: str | None,
    deploy_if_better: bool,
    follow_job: bool,
) -> None:
    """Queue a fine-tuning job on a dataset.

    Example: bitserve jobs create --dataset ds_... --base-model BiT-M-R50x1 --deploy-to pets
    --deploy-if-better --watch"""
    if deploy_if_better and deploy_to is None:
        raise click.UsageError("--deploy-if-better needs --deploy-to NAME")
    job = remote.client.create_job(
        dataset_id,
        base_model,
        overrides,
        validation_fraction=validation_fraction,
        seed=seed,
        name=name,
        serving_precision=serving_precision,
        deploy_to=deploy_to,
        deploy_if_better=deploy_if_better,
    )
    if follow_job:
        follow_to_end(remote, job)
    else:
        remote.emit(job, lambda: render.job_created_line(job))


@jobs.command("watch")
@click.argument("job_id", metavar="ID")
@remote_command
def watch_(remote: Remote, job_id: str) -> None:
    """Follow a job to its end (exit status 0 if it succeeded, 1 if not)."""
    follow_to_end(remote, remote.client.get_job(job_id))


@jobs.command("list")
@click.option("--status", type=click.Choice(STATUSES), help="Only jobs in this status.")
@limit_option
@remote_command
def list_(remote: Remote, status: str | None, limit: int) -> None:
    """List jobs, newest first."""
    items = newest(lambda size: remote.client.list_jobs(status, page_size=size), limit)
    remote.emit(items, lambda: render.jobs_table(items))


@jobs.command()
@click.argument("job_id", metavar="ID")
@remote_command
def show(remote: Remote, job_id: str) -> None:
    """Show a job: status, plan, progress, error, model."""
    job = remote.client.get_job(job_id)
    remote.emit(job, lambda: render.details_table(render.job_rows(job)))


@jobs.command()
@click.argument("job_id", metavar="ID")
@remote_command
def cancel(remote: Remote, job_id: str) -> None:
    """Cancel a job (a running one stops after its current step, keeping no model)."""
    job = remote.client.cancel_job(job_id)
    remote.emit(job, lambda: f"job {job['id']} {job['status']}")


def follow_to_end(remote: Remote, job: Mapping[str, Any]) -> None:
    """Show the job's progress until it ends, then its summary line; exit status 1 unless it
    succeeded. Ctrl-C stops watching only (exit status 130): the job goes on."""
    job_id = job["id"]
    display = watch.reporter(watch.JOB, job_id, remote.human, remote.console())
    try:
        final = watch.follow(remote.client.watch_job(job_id), job, display)
    except KeyboardInterrupt:
        remote.note(
            f"stopped watching; job {job_id} goes on (bitserve jobs watch {job_id}, "
            f"bitserve jobs cancel {job_id})"
        )
        click.get_current_context().exit(130)
    remote.emit(final)
    remote.note(render.job_summary(final))
    if final.get("deployment"):
        remote.note(render.deploy_outcome_line(final["deployment"]))
    if final.get("status") != "succeeded":
        click.get_current_context().exit(1)
