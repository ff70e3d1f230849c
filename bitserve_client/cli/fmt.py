"""The building blocks of what the CLI prints: numbers, sizes, durations and times as text, and
the borderless tables (bitserve_client.cli.render and render_scoring build on them)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from rich.text import Text

# The end states of jobs and batch predictions: progress shown for them is final, not live.
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


def details_table(rows: Sequence[tuple[str, object]]) -> Table:
    """`show`: one "field  value" line per row."""
    grid = Table(box=None, pad_edge=False, show_edge=False, show_header=False)
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(Text(key), Text("-" if value is None else str(value)))
    return grid
