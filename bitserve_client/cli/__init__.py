"""`bitserve datasets|jobs|models|predict|deployments`: the commands that work with a RUNNING
service, on top of BitserveClient (click for the commands, rich for tables and live progress).

Only this package imports click and rich (tests/unit/test_layering.py checks it). The
`bitserve` entry point (service.cli) hands these command names to `main` before its own
parsing; `python -m bitserve_client.cli` runs them on a machine without the service.

Modules: app (the root group), remote (connection options, output, one-line errors),
datasets, jobs, models (and predict), deployments, watch (live bar or plain lines), render
(text; with render_scoring for evaluations, batch predictions and predictions, and fmt for
numbers and tables), render_deployments (deployments' text).
"""

from bitserve_client.cli.app import COMMANDS, cli, main

__all__ = ["COMMANDS", "cli", "main"]
