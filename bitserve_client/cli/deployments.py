"""`bitserve deployments list|show|create|update|rollback|history|stats|delete|predict`:
stable names for served models (one model, or a split by weight, plus an optional shadow).

Each command calls one client method and passes the API's answer to `remote.emit` with a
rendering from render_deployments, as the `models` commands do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Group, RenderableType
from rich.text import Text

from bitserve_client.cli import render_deployments as render
from bitserve_client.cli.models import batches
from bitserve_client.cli.remote import Remote, limit_option, newest, remote_command

NAME = click.argument("name", metavar="NAME")


@click.group()
def deployments() -> None:
    """Stable names for served models: predict through a name while the model behind it
    changes (a split by weight, a shadow that only listens, a rollback in one call).

    \b
    Example:
      bitserve deployments create pets --model mdl_a
      bitserve deployments predict pets cat.jpg
      bitserve deployments update pets --split mdl_a=90 --split mdl_b=10 --shadow mdl_c
      bitserve deployments stats pets
      bitserve deployments rollback pets
    """


def parse_split(values: tuple[str, ...]) -> list[tuple[str, int]]:
    """`--split MDL=WEIGHT` values as (model id, weight) pairs; a usage error for a bad one."""
    pairs = []
    for value in values:
        model_id, sep, weight = value.rpartition("=")
        if not sep or not model_id or not weight.isdigit() or int(weight) < 1:
            raise click.BadParameter(
                f"{value!r}: expected MODEL=WEIGHT with a whole WEIGHT of at least 1, "
                "e.g. mdl_a=90",
                param_hint="'--split'",
            )
        pairs.append((model_id, int(weight)))
    return pairs


def _targets_options(func: Any) -> Any:
    func = click.option(
        "--split",
        "split",
        multiple=True,
        metavar="MODEL=WEIGHT",
        help="Split the requests by weight: 2 to 5 of these (e.g. --split mdl_a=90 --split "
        "mdl_b=10); the models must have the same classes.",
    )(func)
    func = click.option(
        "--model", "model_id", metavar="MODEL", help="The one model that answers every request."
    )(func)
    return func


def _targets(model_id: str | None, split: tuple[str, ...]) -> dict[str, Any]:
    if model_id is not None and split:
        raise click.UsageError("give --model or --split, not both")
    if model_id is not None:
        return {"model_id": model_id}
    if split:
        return {"targets": parse_split(split)}
    return {}


@deployments.command("list")
@limit_option
@remote_command
def list_(remote: Remote, limit: int) -> None:
    """List deployments, newest first: what each name points at."""
    items = newest(lambda size: remote.client.list_deployments(page_size=size), limit)
    remote.emit(items, lambda: render.deployments_table(items))


@deployments.command()
@NAME
@remote_command
def show(remote: Remote, name: str) -> None:
    """Show a deployment: version, targets and their shares, shadow.

    Example: bitserve deployments show pets
    """
    deployment = remote.client.get_deployment(name)
    remote.emit(deployment, lambda: render.deployment_details(deployment))


@deployments.command()
@NAME
@_targets_options
@click.option(
    "--shadow",
    metavar="MODEL",
    help="A model that gets a copy of each request; its answers are only counted (stats).",
)
@remote_command
def create(
    remote: Remote, name: str, model_id: str | None, split: tuple[str, ...], shadow: str | None
) -> None:
    """Name one model, or a split of several by weight.

    NAME: a-z, 0-9 and - (a DNS label). The service loads and warms the models before it
    answers.

    \b
    Examples:
      bitserve deployments create pets --model mdl_a
      bitserve deployments create pets --split mdl_a=90 --split mdl_b=10 --shadow mdl_c
    """
    targets = _targets(model_id, split)
    if not targets:
        raise click.UsageError("give --model MODEL or --split MODEL=WEIGHT")
    deployment = remote.client.create_deployment(name, shadow_model_id=shadow, **targets)
    remote.emit(deployment, lambda: render.deployment_line(deployment))


@deployments.command()
@NAME
@_targets_options
@click.option("--shadow", metavar="MODEL", help="Set the shadow model (the targets stay).")
@click.option("--no-shadow", is_flag=True, help="Remove the shadow.")
@remote_command
def update(
    remote: Remote,
    name: str,
    model_id: str | None,
    split: tuple[str, ...],
    shadow: str | None,
    no_shadow: bool,
) -> None:
    """Change a deployment's models or its shadow.

    Point it at another model or split, or change its shadow; what is not given stays.
    Requests already running finish on the model they started on.

    \b
    Examples:
      bitserve deployments update pets --model mdl_b
      bitserve deployments update pets --split mdl_a=50 --split mdl_b=50 --no-shadow
    """
    if shadow is not None and no_shadow:
        raise click.UsageError("give --shadow or --no-shadow, not both")
    changes: dict[str, Any] = _targets(model_id, split)
    if shadow is not None or no_shadow:
        changes["shadow_model_id"] = shadow
    if not changes:
        raise click.UsageError("give --model, --split, --shadow or --no-shadow")
    deployment = remote.client.update_deployment(name, **changes)
    remote.emit(deployment, lambda: render.deployment_line(deployment))


@deployments.command()
@NAME
@remote_command
def rollback(remote: Remote, name: str) -> None:
    """Undo a deployment's latest change.

    Points it back at the models and shadow it had before (recorded as a change of its own:
    rolling back twice returns).

    Example: bitserve deployments rollback pets
    """
    deployment = remote.client.rollback_deployment(name)
    remote.emit(deployment, lambda: render.deployment_line(deployment))


@deployments.command()
@NAME
@limit_option
@remote_command
def history(remote: Remote, name: str, limit: int) -> None:
    """List a deployment's changes, newest first.

    Who (the API key's id), when, from what, to what.

    Example: bitserve deployments history pets
    """
    items = newest(lambda size: remote.client.deployment_history(name, page_size=size), limit)
    remote.emit(items, lambda: render.history_table(items))


@deployments.command()
@NAME
@remote_command
def stats(remote: Remote, name: str) -> None:
    """Show the figures of each model behind a deployment.

    Per model that answered through the name: role, weight, requests, errors, latency (mean,
    p50, p95), the most frequent first labels and, for a shadow, how often its first label
    agreed with the target's. Summed over every gateway.

    Example: bitserve deployments stats pets
    """
    figures = remote.client.deployment_stats(name)

    def view() -> RenderableType | str:
        head = f"deployment {figures['deployment']} v{figures['version']}"
        return Group(Text(head), "", render.stats_table(figures))

    remote.emit(figures, view)


@deployments.command()
@NAME
@remote_command
def delete(remote: Remote, name: str) -> None:
    """Delete a deployment (its models stay).

    Example: bitserve deployments delete pets
    """
    remote.client.delete_deployment(name)
    remote.emit({"name": name, "deleted": True}, lambda: f"deleted deployment {name}")


@deployments.command()
@NAME
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
def predict(remote: Remote, name: str, images: tuple[Path, ...], top_k: int) -> None:
    """Classify images through a deployment.

    One line per image: file, label, score, the model that answered. --json: {deployment, predictions: [{model_id, version, top_k}]},
    one per image in order (many files go in several requests, which a split may send to
    different models).

    Example: bitserve deployments predict pets cat.jpg dog.jpg --top-k 3
    """
    answers: list[dict[str, Any]] = []
    for batch in batches(images):
        answer = remote.client.predict_deployment(name, batch, top_k=top_k)
        who = {"model_id": answer["model_id"], "version": answer["version"]}
        answers += [{**who, "top_k": p["top_k"]} for p in answer["predictions"]]
    result = {"deployment": name, "predictions": answers}
    remote.emit(result, lambda: render.predictions_table([str(p) for p in images], answers))
