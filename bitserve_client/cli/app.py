"""The root of the remote commands: `bitserve datasets|jobs|models|predict|deployments ...`."""

from __future__ import annotations

from collections.abc import Sequence

import click

from bitserve_client.cli.datasets import datasets
from bitserve_client.cli.deployments import deployments
from bitserve_client.cli.jobs import jobs
from bitserve_client.cli.models import models, predict

COMMANDS = ("datasets", "jobs", "models", "predict", "deployments")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """Work with a running bitserve service (`bitserve up`, or BITSERVE_URL).

    Every command takes --url (env BITSERVE_URL), --api-key (env BITSERVE_API_KEY, else the
    admin key `bitserve up` wrote) and --json (the API's JSON only, on stdout). Errors are one
    line on stderr and exit status 1; usage errors exit 2.
    """


cli.add_command(datasets)
cli.add_command(jobs)
cli.add_command(models)
cli.add_command(predict)
cli.add_command(deployments)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line (argv without the program name); return the exit status."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="bitserve")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
