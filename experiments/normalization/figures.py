"""The explainer's figures (PNG), drawn from the CSV rows only.

Sized for print: every figure is drawn 16 cm (6.3 in) wide and at most 7 cm high, so that at
the A4 PDF's text width nothing is scaled down and no text is smaller than 8 pt.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display (set before pyplot is imported)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.transforms import ScaledTranslation

from experiments.normalization.summary import LABELS, Row, mean_std, threads, values

COLORS = {
    "bn": "tab:red",
    "bn_ws": "tab:orange",
    "bn_frozen": "tab:brown",
    "gn": "tab:blue",
    "gn_ws": "tab:green",
    "gn_ws_folded": "tab:olive",
}
FILES = (
    "norm_axes.png",
    "accuracy_vs_device_batch.png",
    "training_curves.png",
    "transfer.png",
    "timing.png",
)
PAD_IN = 0.02  # white border around a saved figure
WIDTH_IN = 16 / 2.54 - 2 * PAD_IN  # the PDF's text width; figures are drawn at print size
MAX_HEIGHT_IN = 7 / 2.54
DPI = 200
SMALL = 8.0  # the smallest text anywhere (tick labels, legends, value labels), in points
STYLE = {
    "font.size": 8.5,
    "axes.titlesize": 9.0,
    "axes.labelsize": 8.5,
    "figure.titlesize": 9.5,
    "figure.labelsize": 8.5,
    "xtick.labelsize": SMALL,
    "ytick.labelsize": SMALL,
    "legend.fontsize": SMALL,
    "legend.title_fontsize": SMALL,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def write_all(rows: Sequence[Row], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    drawers = (norm_axes, accuracy_vs_device_batch, training_curves, transfer, timing)
    paths = []
    for name, draw in zip(FILES, drawers, strict=True):
        with plt.style.context(STYLE):
            fig = draw(rows)
            path = out_dir / name
            fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=PAD_IN)
        plt.close(fig)
        paths.append(path)
    return paths


def _figure(
    height: float,
    ncols: int = 1,
    width_ratios: Sequence[float] | None = None,
    sharey: bool = False,
) -> tuple[plt.Figure, np.ndarray]:
    """A print-width figure with a row of ncols panels (constrained layout keeps it inside)."""
    fig, axes = plt.subplots(
        1,
        ncols,
        figsize=(WIDTH_IN, min(height, MAX_HEIGHT_IN)),
        layout="constrained",
        squeeze=False,
        width_ratios=width_ratios,
        sharey=sharey,
    )
    return fig, axes[0]


def _seeds(samples: dict[tuple[str, str], list[float]]) -> int:
    return max((len(v) for v in samples.values()), default=0)


def _grid(ax: Axes, shade: np.ndarray, title: str, xlabel: str, ylabel: str) -> None:
    """A small grid of cells; shade holds a colour index per cell (0 = not used)."""
    palette = np.array([[0.93, 0.93, 0.93], [0.85, 0.3, 0.3], [0.3, 0.45, 0.85], [0.3, 0.7, 0.4]])
    ax.imshow(palette[shade], aspect="auto")
    rows, cols = shade.shape
    ax.set_xticks(np.arange(-0.5, cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, rows, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def norm_axes(rows: Sequence[Row]) -> plt.Figure:
    """Which numbers share one mean and variance, for BN (per device), GN and WS."""
    del rows
    fig, axes = _figure(2.7, 3)
    bn = np.zeros((8, 8), dtype=int)
    bn[0:4, 2] = 1  # device 1: channel 3 over its 4 images
    bn[4:8, 2] = 2  # device 2: its own statistic for the same channel
    _grid(
        axes[0],
        bn,
        "BatchNorm\none channel, all images\nof one device",
        "channels",
        "images (2 devices of 4)",
    )
    axes[0].axhline(3.5, color="black", linewidth=1.5)
    for y, name in ((1.5, "device 1"), (5.5, "device 2")):
        axes[0].text(5.0, y, name, va="center", ha="center")
    gn = np.zeros((8, 8), dtype=int)
    gn[2, 4:8] = 2  # one image, one group of 4 channels
    gn[5, 0:4] = 3
    _grid(
        axes[1],
        gn,
        "GroupNorm\none image, one group\nof channels",
        "channels (2 groups of 4)",
        "images",
    )
    ws = np.zeros((6, 9), dtype=int)
    ws[1, :] = 3
    _grid(
        axes[2],
        ws,
        "Weight Standardization\none filter, all its weights\n(weights, not images)",
        "weights of one filter",
        "filters",
    )
    fig.suptitle("Shaded cells share one mean and one variance")
    fig.supxlabel(
        "BatchNorm, GroupNorm: a cell is one channel of one image (all its pixels). WS: one weight.",
        fontsize=SMALL,
    )
    return fig


def _by_batch(
    samples: dict[tuple[str, str], list[float]], method: str
) -> tuple[list[int], list[float], list[float]]:
    keys = sorted((int(b), v) for (m, b), v in samples.items() if m == method and b)
    xs = [b for b, _ in keys]
    stats = [mean_std(v) for _, v in keys]
    return xs, [100 * m for m, _ in stats], [100 * s for _, s in stats]


def accuracy_vs_device_batch(rows: Sequence[Row]) -> plt.Figure:
    acc = values(rows, "main", "test_acc")
    fig, axes = _figure(2.75, 2, width_ratios=(3, 2))
    for ax, zoom in zip(axes, (False, True), strict=True):
        batches: set[int] = set()
        for method in ("bn", "bn_ws"):
            xs, means, stds = _by_batch(acc, method)
            batches.update(xs)
            if xs:
                ax.errorbar(
                    xs,
                    means,
                    yerr=stds,
                    marker="o",
                    markersize=4,
                    capsize=3,
                    color=COLORS[method],
                    label=f"{LABELS[method]},\nb per device",
                )
        for method in ("gn", "gn_ws"):
            found = [v for (m, _b), v in acc.items() if m == method]
            if found:
                mean, std = mean_std(found[0])
                ax.axhline(
                    100 * mean,
                    color=COLORS[method],
                    label=LABELS[method].replace(" (", "\n(") + ", any b",
                )
                ax.axhspan(100 * (mean - std), 100 * (mean + std), color=COLORS[method], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(batches), [str(b) for b in sorted(batches)])
        ax.minorticks_off()
        ax.grid(axis="y", color="0.9")
        if zoom:
            ax.set_ylim(90, 100)
            ax.set_xlim(3, 40)
            ax.set_title("Zoom on b = 4 to 32")
        else:
            ax.axhline(10, color="grey", linestyle=":")
            ax.text(32, 11, "chance (1 in 10)", ha="right", va="bottom", color="0.35")
            ax.set_ylim(0, 102)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title("b = 1 to 32")
    handles, labels = axes[0].get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: not labels[i].startswith("BatchNorm"))
    fig.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        loc="outside right center",
        labelspacing=0.9,
    )
    fig.supxlabel("images per device (b), log scale; 32 images per step in total")
    fig.suptitle(f"Bars and shaded bands: ±1 standard deviation over {_seeds(acc)} seeds")
    return fig


def training_curves(rows: Sequence[Row]) -> plt.Figure:
    curves: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["experiment"] == "main" and row["metric"] == "train_loss":
            key = (str(row["method"]), str(row["device_batch"]))
            curves[key][int(str(row["step"]))].append(float(str(row["value"])))
    fig, axes = _figure(2.75)
    ax = axes[0]
    styles = {"2": ":", "8": "--", "32": "-"}
    seeds = 0
    for (method, device_batch), points in curves.items():
        if method == "bn_ws" or (method == "bn" and device_batch not in styles):
            continue
        steps = sorted(points)
        seeds = max(seeds, *(len(points[s]) for s in steps))
        means = [float(np.mean(points[s])) for s in steps]
        lows = [min(points[s]) for s in steps]
        highs = [max(points[s]) for s in steps]
        label = LABELS[method] + (
            f",\n{device_batch} images per device" if device_batch else ",\nany split"
        )
        style = styles.get(device_batch, "-")
        ax.plot(steps, means, color=COLORS[method], linestyle=style, label=label)
        ax.fill_between(steps, lows, highs, color=COLORS[method], alpha=0.15, linewidth=0)
    ax.set_yscale("log")
    ax.grid(axis="y", which="major", color="0.9")
    ax.set_xlabel("training step (32 images per step)")
    ax.set_ylabel("training loss (log scale)")
    ax.set_title(f"Lines: mean of {seeds} seeds; shaded: lowest to highest seed")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), labelspacing=0.8)
    return fig


def _bars(
    ax: Axes,
    xs: Sequence[float],
    samples: Sequence[list[float]],
    colors: Sequence[str],
    digits: int,
) -> None:
    """Vertical bars at the mean, ±1 std error bars, the mean written above each."""
    stats = [mean_std(s) if s else (0.0, 0.0) for s in samples]
    spread = [s for _, s in stats]
    ax.bar(
        xs,
        [m for m, _ in stats],
        yerr=spread if any(spread) else None,
        capsize=3,
        color=colors,
        width=0.8,
    )
    for x, (m, s), found in zip(xs, stats, samples, strict=True):
        ax.annotate(
            f"{m:.{digits}f}" if found else "-",
            (float(x), m + s),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=SMALL,
        )
    ax.margins(y=0.12)


def _group(ax: Axes, start: float, end: float, text: str, lines: int = 2) -> None:
    """A line and a label under the tick labels (`lines` lines high) of the bars start..end."""
    offset = 5 + 10 * lines  # points from the x axis down to the line
    below = ScaledTranslation(0, -offset / 72, ax.figure.dpi_scale_trans)
    ax.plot(
        [start - 0.4, end + 0.4],
        [0, 0],
        transform=ax.get_xaxis_transform() + below,
        color="0.4",
        linewidth=0.8,
        clip_on=False,
    )
    ax.annotate(
        text,
        xy=((start + end) / 2, 0),
        xycoords=("data", "axes fraction"),
        xytext=(0, -offset - 2),
        textcoords="offset points",
        ha="center",
        va="top",
        annotation_clip=False,
    )


def transfer(rows: Sequence[Row]) -> plt.Figure:
    def first(metric: str, method: str, scale: float = 100.0) -> list[float]:
        found = [v for (m, _b), v in values(rows, "transfer", metric).items() if m == method]
        return [scale * x for x in found[0]] if found else []

    fig, (left, right) = _figure(2.75, 2, width_ratios=(11, 8))
    accuracy = [
        ("updated", first("target_test_acc", "bn"), COLORS["bn"]),
        ("re-\nestimated", first("target_test_acc_recalibrated", "bn"), "salmon"),
        ("frozen", first("target_test_acc", "bn_frozen"), COLORS["bn_frozen"]),
        ("no WS", first("target_test_acc", "gn"), COLORS["gn"]),
        ("with WS", first("target_test_acc", "gn_ws"), COLORS["gn_ws"]),
    ]
    xs = [0.0, 1.0, 2.0, 3.2, 4.2]
    _bars(left, xs, [a[1] for a in accuracy], [a[2] for a in accuracy], 1)
    left.set_xticks(xs, [a[0] for a in accuracy])
    left.tick_params(axis="x", length=0)
    _group(left, 0, 2, "BatchNorm (its statistics)")
    _group(left, 3.2, 4.2, "GroupNorm")
    left.set_ylabel("accuracy (%)")
    left.set_title("Accuracy on new digits\nafter fine-tuning")
    seeds = max(len(a[1]) for a in accuracy)

    gaps = [
        ("old\ndigits", first("stats_mismatch_source", "bn", 1.0), "0.65"),
        ("new\ndigits", first("stats_mismatch_target", "bn", 1.0), "0.35"),
        ("updated", first("stats_mismatch_after", "bn", 1.0), COLORS["bn"]),
        ("frozen", first("stats_mismatch_after", "bn_frozen", 1.0), COLORS["bn_frozen"]),
    ]
    xs = [0.0, 1.0, 2.2, 3.2]
    _bars(right, xs, [g[1] for g in gaps], [g[2] for g in gaps], 3)
    right.set_xticks(xs, [g[0] for g in gaps])
    right.tick_params(axis="x", length=0)
    _group(right, 0, 1, "before\nfine-tuning")
    _group(right, 2.2, 3.2, "after fine-tuning\n(new digits)")
    right.set_ylabel("error of stored mean\n(standard deviations of the data)")
    right.set_title("How wrong BatchNorm's\nstored averages are")
    fig.suptitle(
        f"Old digits: 0-4, new digits: 5-9; black lines: ±1 standard deviation over {seeds} seeds"
    )
    return fig


def _timing_rounds(rows: Sequence[Row]) -> dict[tuple[str, str], dict[str, list[float]]]:
    """(phase, batch) -> method -> one median per round.

    Rows from before rounds were recorded have an empty step: one round each.
    """
    cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["experiment"] == "timing" and str(row["metric"]).endswith("_ms"):
            phase = str(row["metric"]).removesuffix("_ms")
            cells[(phase, str(row["batch"]))][str(row["method"])].append(float(str(row["value"])))
    return cells


def _batch_order(key: tuple[str, str]) -> tuple[bool, str, int]:
    phase, batch = key
    return (phase != "train", phase, int(batch) if batch.isdigit() else 0)


def _timing_title(phase: str, batch: str) -> str:
    what = {"train": "training step", "infer": "inference"}.get(phase, phase)
    if batch == "1":
        return f"{what},\n1 image"
    return f"{what},\nbatch of {batch}"


def timing(rows: Sequence[Row]) -> plt.Figure:
    cells = _timing_rounds(rows)
    panels = sorted(cells, key=_batch_order)
    fig, axes = _figure(2.6, max(1, len(panels)), sharey=True)
    methods = ("bn", "gn", "gn_ws", "gn_ws_folded")
    names = [LABELS[m].replace(", ", ",\n").replace(" (", "\n(") for m in methods]
    ys = np.arange(len(methods))
    rounds = sorted({len(v) for by_method in cells.values() for v in by_method.values()})
    for ax, (phase, batch) in zip(axes, panels, strict=False):
        by_method = cells[(phase, batch)]
        top = 0.0
        for y, method in zip(ys, methods, strict=True):
            found = by_method.get(method)
            if not found:
                ax.text(0, y, "  not measured", va="center", color="0.4", fontsize=SMALL)
                continue
            median = float(np.median(found))
            low, high = min(found), max(found)
            ax.barh(y, median, color=COLORS[method], height=0.7)
            if len(found) >= 2:
                ax.errorbar(
                    median,
                    y,
                    xerr=[[median - low], [high - median]],
                    color="black",
                    capsize=2.5,
                    linewidth=1,
                )
            ax.annotate(
                f"{median:.1f}",
                (high, y),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=SMALL,
            )
            top = max(top, high)
        ax.set_xlim(0, 1.3 * top if top else 1)
        ax.set_title(_timing_title(phase, batch))
        ax.grid(axis="x", color="0.9")
        ax.set_axisbelow(True)
    axes[0].set_yticks(ys, names)
    axes[0].invert_yaxis()
    axes[0].tick_params(axis="y", length=0)
    if rounds and rounds[-1] >= 2:
        count = str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}"
        xlabel = f"milliseconds per call (median of {count} rounds; bars: fastest to slowest round)"
    else:
        xlabel = "milliseconds per call (median of repeated calls, one round)"
    fig.supxlabel(xlabel)
    n = threads(rows)
    fig.suptitle(f"Time per call on a CPU ({n} thread{'s' if n != 1 else ''}), same network")
    return fig
