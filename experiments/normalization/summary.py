"""Mean and spread over seeds, from the CSV rows, as the Markdown tables the explainer quotes."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

LABELS = {
    "bn": "BatchNorm",
    "bn_ws": "BatchNorm + WS",
    "bn_frozen": "BatchNorm, statistics frozen",
    "gn": "GroupNorm",
    "gn_ws": "GroupNorm + WS (BiT)",
    "gn_ws_folded": "GroupNorm + WS, WS folded",
}
# Spatial size of the last stage's feature maps for 32x32 inputs (root /4, stages 2-4 /2 each),
# so a BatchNorm there averages b values per channel; GroupNorm (8 groups) averages at least
# 128 / 8 channels x 1 pixel = 16 values of the one image.
LAST_STAGE_PIXELS = 1

Row = Mapping[str, object]
Key = tuple[str, str]  # (method, device_batch as written in the CSV: "" for GroupNorm)


def values(rows: Iterable[Row], experiment: str, metric: str) -> dict[Key, list[float]]:
    """Every seed's value of `metric`, grouped by (method, device_batch), in CSV order."""
    grouped: dict[Key, list[float]] = defaultdict(list)
    for row in rows:
        if row["experiment"] == experiment and row["metric"] == metric:
            grouped[(str(row["method"]), str(row["device_batch"]))].append(float(str(row["value"])))
    return dict(grouped)


def mean_std(samples: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    mean = statistics.fmean(samples)
    return mean, statistics.stdev(samples) if len(samples) > 1 else 0.0


def pct(samples: list[float] | None) -> str:
    if not samples:
        return "-"
    mean, std = mean_std(samples)
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def num(samples: list[float] | None, digits: int = 3) -> str:
    if not samples:
        return "-"
    if any(math.isnan(s) for s in samples):
        return "diverged"
    mean, std = mean_std(samples)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _batch_label(device_batch: str) -> str:
    return device_batch if device_batch else "any"


def main_table(rows: Sequence[Row]) -> str:
    acc = values(rows, "main", "test_acc")
    acc_bs = values(rows, "main", "test_acc_batch_stats")
    loss = values(rows, "main", "final_train_loss")
    seeds = max((len(v) for v in acc.values()), default=0)
    lines = [
        f"Test accuracy on 599 held-out digits, mean ± sample std over {seeds} seed(s); "
        "global batch 32 in every run.",
        "",
        "| network | images per device b | values per statistic, last stage | "
        "test acc % (running stats, as deployed) | test acc % (batch statistics) | "
        "final train loss |",
        "|---|---|---|---|---|---|",
    ]
    for method, device_batch in acc:
        per_stat = (
            str(int(device_batch) * LAST_STAGE_PIXELS) if device_batch else "16 per image (any b)"
        )
        key = (method, device_batch)
        lines.append(
            f"| {LABELS[method]} | {_batch_label(device_batch)} | {per_stat} | {pct(acc[key])} | "
            f"{pct(acc_bs.get(key))} | {num(loss.get(key))} |"
        )
    return "\n".join(lines)


def transfer_table(rows: Sequence[Row]) -> str:
    metrics = {
        "source_test_acc": ("upstream acc % on digits 0-4", pct),
        "stats_mismatch_source": ("BN mean gap on 0-4 before (std units)", num),
        "stats_mismatch_target": ("BN mean gap on 5-9 before (std units)", num),
        "target_test_acc": ("downstream acc % on 5-9 (running stats)", pct),
        "target_test_acc_batch_stats": ("downstream acc % (batch statistics)", pct),
        "stats_mismatch_after": ("BN mean gap on 5-9 after (std units)", num),
        "target_test_acc_recalibrated": ("downstream acc % after re-estimating BN stats", pct),
    }
    table = {metric: values(rows, "transfer", metric) for metric in metrics}
    # The frozen-statistics run fine-tunes the same upstream BatchNorm model as "bn".
    shared = ("source_test_acc", "stats_mismatch_source", "stats_mismatch_target")
    methods = ("bn", "bn_frozen", "gn", "gn_ws")
    lines = [
        "| measurement | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for metric, (title, fmt) in metrics.items():
        cells = []
        for method in methods:
            lookup = "bn" if method == "bn_frozen" and metric in shared else method
            found = [v for (m, _b), v in table[metric].items() if m == lookup]
            cells.append(fmt(found[0]) if found else "-")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def threads(rows: Iterable[Row]) -> int:
    found = [r["value"] for r in rows if r["metric"] == "torch_threads"]
    return int(float(str(found[0]))) if found else 0


TIMING_METHODS = ("bn", "gn", "gn_ws", "gn_ws_folded")


def timing_rounds(rows: Iterable[Row]) -> dict[tuple[str, str], dict[str, list[float]]]:
    """Per (phase, batch) and method, each round's median ms, in round order."""
    cells: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in rows:
        if row["experiment"] == "timing" and str(row["metric"]).endswith("_ms"):
            phase = str(row["metric"]).removesuffix("_ms")
            round_index = int(str(row["step"]) or 0)  # CSVs before rounds: one round, no step
            value = float(str(row["value"]))
            cells[(phase, str(row["batch"]))][str(row["method"])].append((round_index, value))
    return {
        key: {method: [v for _r, v in sorted(found)] for method, found in by_method.items()}
        for key, by_method in cells.items()
    }


def spread(samples: list[float], digits: int = 1, unit: str = "") -> str:
    """'median (range min–max)' over rounds, or just the value for a single round."""
    median = statistics.median(samples)
    if len(samples) < 2:
        return f"{median:.{digits}f}{unit}"
    return f"{median:.{digits}f}{unit} ({min(samples):.{digits}f}–{max(samples):.{digits}f})"


def timing_table(rows: Sequence[Row]) -> str:
    cells = timing_rounds(rows)
    rounds = max((len(v) for by in cells.values() for v in by.values()), default=0)
    header = "| phase | batch | " + " | ".join(LABELS[m] for m in TIMING_METHODS) + " |"
    rule = "|---|---|" + "---|" * len(TIMING_METHODS)
    lines = [
        f"Milliseconds per call on this machine's CPU ({threads(rows)} torch thread(s)), same "
        f"network: the median of {rounds} rounds (each round's figure is the median of its "
        "calls), and in parentheses the range from the fastest to the slowest round.",
        "",
        header,
        rule,
    ]
    for (phase, batch), by_method in cells.items():
        parts = [spread(by_method[m]) if m in by_method else "-" for m in TIMING_METHODS]
        lines.append(f"| {phase} | {batch} | " + " | ".join(parts) + " |")
    lines += [
        "",
        "Relative to BatchNorm, round by round (a method's time over BatchNorm's in the same "
        "round): median and range over the rounds.",
        "",
        header,
        rule,
    ]
    for (phase, batch), by_method in cells.items():
        base = by_method["bn"]
        parts = []
        for method in TIMING_METHODS:
            if method not in by_method:
                parts.append("-")
                continue
            ratios = [t / b for t, b in zip(by_method[method], base, strict=True)]
            parts.append(spread(ratios, digits=2, unit="x") if method != "bn" else "1x")
        lines.append(f"| {phase} | {batch} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def markdown(rows: Sequence[Row]) -> str:
    return "\n".join(
        [
            "# Normalization experiment: summary (generated from normalization_runs.csv)",
            "",
            "Written by `python -m experiments.normalization.run`; do not edit by hand.",
            "",
            "## Accuracy vs images per device",
            "",
            main_table(rows),
            "",
            "## Transfer: pre-train on digits 0-4, fine-tune on 20 images per class of 5-9",
            "",
            transfer_table(rows),
            "",
            "## Cost",
            "",
            timing_table(rows),
            "",
        ]
    )
