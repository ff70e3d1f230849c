"""What the CLI prints for deployments (stable names for served models): the one-line state of
a deployment, its details, the listing, its history, per-image predictions with the model
that answered, and its figures as one column per model. Pure functions of the API's objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.table import Table

from bitserve_client.cli.fmt import add_row, details_table, fmt_percent, fmt_score, fmt_time, table

# How many first labels the figures show per model (most frequent first, as the API orders them).
TOP_LABELS = 3


def targets_text(targets: Sequence[Mapping[str, Any]], shadow: str | None = None) -> str:
    """ "mdl_a" (one model), "mdl_a 90%, mdl_b 10%" (a split, by share of the requests), with
    " + shadow mdl_c" when there is one."""
    if len(targets) == 1:
        text = str(targets[0]["model_id"])
    else:
        total = sum(int(t["weight"]) for t in targets) or 1
        text = ", ".join(f"{t['model_id']} {_share(int(t['weight']), total)}" for t in targets)
    return f"{text} + shadow {shadow}" if shadow else text


def _share(weight: int, total: int) -> str:
    percent = 100 * weight / total
    return f"{percent:.0f}%" if percent == round(percent) else f"{percent:.1f}%"


def deployment_line(d: Mapping[str, Any]) -> str:
    """What create, update and rollback print: "deployment pets v2: mdl_b + shadow mdl_c"."""
    return (
        f"deployment {d.get('name')} v{d.get('version')}: "
        f"{targets_text(d.get('targets') or [], d.get('shadow_model_id'))}"
    )


def deployment_rows(d: Mapping[str, Any]) -> list[tuple[str, object]]:
    targets = d.get("targets") or []
    total = sum(int(t["weight"]) for t in targets) or 1
    rows: list[tuple[str, object]] = [("name", d.get("name")), ("version", d.get("version"))]
    for i, t in enumerate(targets):
        share = "all requests" if len(targets) == 1 else f"weight {t['weight']}, "
        if len(targets) > 1:
            share += f"{_share(int(t['weight']), total)} of the requests"
        rows.append(("target" if i == 0 else "", f"{t['model_id']} ({share})"))
    rows += [
        ("shadow", d.get("shadow_model_id") or "none"),
        ("created", fmt_time(d.get("created_at"))),
        ("updated", fmt_time(d.get("updated_at"))),
    ]
    return rows


def deployment_details(d: Mapping[str, Any]) -> Table:
    return details_table(deployment_rows(d))


def deployments_table(items: Iterable[Mapping[str, Any]]) -> Table:
    grid = table("NAME", "VERSION", "TARGETS", "SHADOW", "UPDATED")
    for d in items:
        add_row(
            grid,
            d.get("name"),
            d.get("version"),
            targets_text(d.get("targets") or []),
            d.get("shadow_model_id"),
            fmt_time(d.get("updated_at")),
        )
    return grid


def history_table(items: Iterable[Mapping[str, Any]]) -> Table:
    """One line per change, newest first: what it pointed at before and after."""
    grid = table("VERSION", "ACTION", "AT", "BY", "FROM", "TO")
    for change in items:
        before, after = change.get("before"), change.get("after") or {}
        add_row(
            grid,
            change.get("version"),
            change.get("action"),
            fmt_time(change.get("at")),
            change.get("actor"),
            None if before is None else _targets_of(before),
            _targets_of(after),
        )
    return grid


def _targets_of(state: Mapping[str, Any]) -> str:
    return targets_text(state.get("targets") or [], state.get("shadow_model_id"))


def predictions_table(files: Sequence[str], answers: Sequence[Mapping[str, Any]]) -> Table:
    """One line per image: the file, its top label and score, the runners-up if asked, and the
    model that answered (`answers`: per image, {model_id, version, top_k})."""
    others = any(len(a["top_k"]) > 1 for a in answers)
    grid = table("FILE", "LABEL", "SCORE", *(["NEXT"] if others else []), "MODEL")
    for name, answer in zip(files, answers, strict=True):
        top, rest = answer["top_k"][0], answer["top_k"][1:]
        runners_up = ", ".join(f"{x['label']} {fmt_score(x['score'])}" for x in rest)
        add_row(
            grid,
            name,
            top["label"],
            fmt_score(top["score"]),
            *([runners_up] if others else []),
            answer["model_id"],
        )
    return grid


def _latency(value: float | None) -> str:
    return "over 10 s" if value is None else f"{value:.1f} ms"


def _top_labels(counts: Mapping[str, int]) -> str | None:
    """ "cat 12 (60.0%), dog 8 (40.0%)": the TOP_LABELS most frequent first labels, each with
    its share of the images the model labelled."""
    total = sum(counts.values())
    shown = list(counts.items())[:TOP_LABELS]
    return ", ".join(f"{label} {n} ({fmt_percent(n / total)})" for label, n in shown) or None


def _agreement(agreement: Mapping[str, int] | None) -> str | None:
    """A shadow's first labels that matched the target's: "83.3% (5/6)"."""
    if agreement is None:
        return None
    compared, agreed = agreement["compared"], agreement["agreed"]
    return f"{fmt_percent(agreed / compared if compared else None)} ({agreed}/{compared})"


def stats_table(stats: Mapping[str, Any]) -> Table | str:
    """The figures side by side: one column per model that answered through the name (its
    targets, then the shadow and former ones), one row per figure."""
    models = stats.get("models") or []
    if not models:
        return f"deployment {stats.get('deployment')} v{stats.get('version')}: no requests yet"
    grid = table("MODEL", *(str(m["model_id"]) for m in models))
    rows: list[tuple[str, list[object]]] = [
        ("role", [m["role"] for m in models]),
        ("weight", [m["weight"] for m in models]),
        ("requests", [m["requests"] for m in models]),
        ("errors", [m["errors"] for m in models]),
        ("images", [m["images"] for m in models]),
    ]
    for key, label in (("mean", "latency mean"), ("p50", "latency p50"), ("p95", "latency p95")):
        rows.append(
            (
                label,
                [None if not m["latency_ms"] else _latency(m["latency_ms"][key]) for m in models],
            )
        )
    rows += [
        ("top labels", [_top_labels(m["top1_labels"]) for m in models]),
        ("agreement", [_agreement(m["agreement"]) for m in models]),
    ]
    for label, cells in rows:
        add_row(grid, label, *cells)
    return grid
