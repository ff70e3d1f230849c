"""The connection every command shares (--url, --api-key, --json), where output goes, and how
errors become one line on stderr.

Output: with --json, stdout carries only JSON (the API's object, or a list of them); anything
for people (progress, summaries) goes to stderr. Without it, stdout is for people: tables,
summaries, and progress (a live bar on a terminal, plain lines otherwise).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import IO, Any, NoReturn, TypeVar

import click
import httpx
from rich.console import Console, RenderableType

from bitserve_client.client import DEFAULT_URL, BitserveClient
from bitserve_client.errors import (
    ApiError,
    BatchPredictionFailed,
    DatasetFailed,
    DatasetTimeout,
    EvaluationFailed,
    JobTimeout,
    ServerUnreachable,
)

R = TypeVar("R")

# A pipe or file gets whole lines, never folded at 80 columns.
PIPE_WIDTH = 1000


def console_for(stream: IO[str]) -> Console:
    """A rich Console on `stream`: colours and live bars only on a terminal; no markup or
    emoji read from the data it prints (names and file names are the users')."""
    terminal = stream.isatty()
    return Console(
        file=stream,
        width=None if terminal else PIPE_WIDTH,
        highlight=False,
        emoji=False,
        markup=False,
        soft_wrap=not terminal,
    )


def show(console: Console, renderable: RenderableType) -> None:
    """Print; on a pipe without the padding that ends a table's lines (rich pads every cell
    to its column's width)."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    text = "\n".join(line.rstrip() for line in captured.get().splitlines())
    console.file.write(text + "\n")
    console.file.flush()


@dataclass
class Remote:
    """A command's connection and output: `client` is made on first use, closed at the end."""

    url: str
    api_key: str | None
    as_json: bool
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    err: IO[str] = field(default_factory=lambda: sys.stderr)
    _client: BitserveClient | None = None

    @property
    def client(self) -> BitserveClient:
        if self._client is None:
            self._client = BitserveClient(self.url, api_key=self.api_key)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    @property
    def human(self) -> IO[str]:
        """Where lines for people go: stdout, or stderr when stdout is JSON's."""
        return self.err if self.as_json else self.out

    def console(self) -> Console:
        return console_for(self.human)

    def emit(self, value: Any, render: Callable[[], RenderableType | str] | None = None) -> None:
        """The command's result: `value` as JSON with --json, else what `render` makes."""
        if self.as_json:
            self.out.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
            self.out.flush()
        elif render is not None:
            show(self.console(), render())

    def note(self, line: str, *, stderr: bool = False) -> None:
        """A line for people (stderr under --json, or with `stderr`: what a command does on
        the way to its result, when stdout is for that result alone)."""
        stream = self.err if stderr else self.human
        stream.write(line + "\n")
        stream.flush()


def remote_command(func: Callable[..., R]) -> Callable[..., R]:
    """Give a command the connection options; it is called with a Remote first."""

    @click.option("--json", "as_json", is_flag=True, help="Print the API's JSON (only) on stdout.")
    @click.option(
        "--api-key",
        envvar="BITSERVE_API_KEY",
        metavar="KEY",
        help="API key [env BITSERVE_API_KEY; default: the admin key `bitserve up` wrote to "
        "$BITSERVE_HOME/admin.key, ./.bitserve/admin.key].",
    )
    @click.option(
        "--url",
        envvar="BITSERVE_URL",
        default=DEFAULT_URL,
        show_default=True,
        metavar="URL",
        help="The service's address [env BITSERVE_URL].",
    )
    @functools.wraps(func)
    def command(url: str, api_key: str | None, as_json: bool, **kwargs: Any) -> R:
        if not url.startswith(("http://", "https://")):
            raise click.BadParameter(
                f"{url!r} is no http:// or https:// URL", param_hint="'--url' / BITSERVE_URL"
            )
        remote = Remote(url.rstrip("/"), api_key or None, as_json)
        try:
            with _one_line_errors(remote):
                return func(remote, **kwargs)
        finally:
            remote.close()

    return command


limit_option = click.option(
    "--limit",
    default=20,
    show_default=True,
    type=click.IntRange(min=0),
    metavar="N",
    help="Show at most N, newest first (0: all).",
)


def newest(pages: Callable[[int], Iterator[Any]], limit: int) -> list[Any]:
    """The first `limit` items (0: all) of a listing, fetched `pages(page_size)`."""
    items = pages(100 if limit == 0 else min(limit, 100))
    return list(items if limit == 0 else islice(items, limit))


class CliError(click.ClickException):
    """A failed command: one line on stderr ("bitserve: ..."), exit status 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"bitserve: {self.message}", err=True)


def fail(message: str) -> NoReturn:
    raise CliError(message)


@contextmanager
def _one_line_errors(remote: Remote) -> Iterator[None]:
    """The client's errors as one line each, never a traceback."""
    try:
        yield
    except DatasetFailed as exc:
        fail(f"{exc.code}: {exc.message} (dataset {exc.dataset_id} failed)")
    except EvaluationFailed as exc:
        fail(f"{exc.code}: {exc.message} (evaluation {exc.evaluation_id} failed)")
    except BatchPredictionFailed as exc:
        fail(f"{exc.code}: {exc.message} (batch prediction {exc.batch_prediction_id} {exc.status})")
    except ApiError as exc:
        fail(f"{exc.code}: {exc.message}{_hint(exc)}")
    except (JobTimeout, DatasetTimeout) as exc:
        fail(str(exc))
    except ServerUnreachable as exc:  # the client's own words: the URL and how to start one
        fail(str(exc))
    except (httpx.ConnectError, httpx.ConnectTimeout):  # not through the client's requests
        fail(str(ServerUnreachable(remote.url)))
    except httpx.TimeoutException:
        fail(f"the service at {remote.url} did not answer in time")
    except httpx.TransportError as exc:
        fail(f"the connection to {remote.url} failed: {exc or type(exc).__name__}")
    except httpx.InvalidURL as exc:
        fail(f"invalid --url {remote.url!r}: {exc}")


def _hint(exc: ApiError) -> str:
    """What to do about an error the API's message cannot know the cure for on this side."""
    if exc.code in ("missing_api_key", "invalid_api_key"):
        return " (set BITSERVE_API_KEY or --api-key; `bitserve up` writes .bitserve/admin.key)"
    return ""
