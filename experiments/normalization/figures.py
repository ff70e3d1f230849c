"""The explainer's figures (PNG), drawn from the CSV rows only."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display (set before pyplot is imported)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

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


def write_all(rows: Sequence[Row], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    drawers = (norm_axes, accuracy_vs_device_batch, training_curves, transfer, timing)
    paths = []
    for name, draw in zip(FILES, drawers, strict=True):
        fig = draw(rows)
        path = out_dir / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def _grid(ax: Axes, shade: np.ndarray, title: str, xlabel: str, ylabel: str) -> None:
    """A small grid of cells; shade holds a colour index per cell (0 = not used)."""
    palette = np.array([[0.93, 0.93, 0.93], [0.85, 0.3, 0.3], [0.3, 0.45, 0.85], [0.3, 0.7, 0.4]])
    ax.imshow(palette[shade], aspect="equal")
    rows, cols = shade.shape
    ax.set_xticks(np.arange(-0.5, cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, rows, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)


def norm_axes(rows: Sequence[Row]) -> plt.Figure:
    """Which numbers share one mean and variance, for BN (per device), GN and WS."""
    del rows
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    bn = np.zeros((8, 8), dtype=int)
    bn[0:4, 2] = 1  # device 1: channel 3 over its 4 images
    bn[4:8, 2] = 2  # device 2: its own statistic for the same channel
    _grid(
        axes[0],
        bn,
        "BatchNorm: one channel, all images\non this device (2 devices of 4 shown)",
        "channels",
        "images in the batch (each cell = H x W pixels)",
    )
    axes[0].axhline(3.5, color="black", linewidth=2)
    for y, name in ((1.5, "device 1"), (5.5, "device 2")):
        axes[0].text(5.0, y, name, fontsize=9, va="center")
    gn = np.zeros((8, 8), dtype=int)
    gn[2, 4:8] = 2  # one image, one group of 4 channels
    gn[5, 0:4] = 3
    _grid(
        axes[1],
        gn,
        "GroupNorm: one image, one group\nof channels (2 groups of 4 shown)",
        "channels",
        "images in the batch",
    )
    ws = np.zeros((6, 9), dtype=int)
    ws[1, :] = 3
    _grid(
        axes[2],
        ws,
        "Weight Standardization: one filter,\nall its weights (in-channels x 3 x 3)",
        "weights of a filter",
        "filters (output channels)",
    )
    fig.suptitle("Shaded cells share one mean and one variance", fontsize=11, y=1.05)
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
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
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
                    capsize=4,
                    color=COLORS[method],
                    label=f"{LABELS[method]} (per-device statistics)",
                )
        for method in ("gn", "gn_ws"):
            found = [v for (m, _b), v in acc.items() if m == method]
            if found:
                mean, std = mean_std(found[0])
                ax.axhline(100 * mean, color=COLORS[method], label=f"{LABELS[method]} (any b)")
                ax.axhspan(100 * (mean - std), 100 * (mean + std), color=COLORS[method], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(batches), [str(b) for b in sorted(batches)])
        ax.set_xlabel("images per device b (global batch fixed at 32)")
        if zoom:
            ax.set_ylim(90, 100)
            ax.set_xlim(3, 40)
            ax.set_title("Zoom: b >= 4 (shaded: GN mean ± std)")
        else:
            ax.axhline(10, color="grey", linestyle=":", label="chance (10 classes)")
            ax.set_ylim(0, 102)
            ax.set_ylabel("test accuracy % (mean ± std over seeds)")
            ax.set_title("BatchNorm needs several images per device; GroupNorm needs none")
            ax.legend(fontsize=8, loc="lower right")
    return fig


def training_curves(rows: Sequence[Row]) -> plt.Figure:
    curves: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["experiment"] == "main" and row["metric"] == "train_loss":
            key = (str(row["method"]), str(row["device_batch"]))
            curves[key][int(str(row["step"]))].append(float(str(row["value"])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"2": ":", "8": "--", "32": "-"}
    for (method, device_batch), points in curves.items():
        if method in ("bn", "bn_ws") and device_batch not in styles:
            continue
        if method == "bn_ws":
            continue
        steps = sorted(points)
        means = [float(np.mean(points[s])) for s in steps]
        label = LABELS[method] + (f", b = {device_batch}" if device_batch else "")
        ax.plot(
            steps, means, color=COLORS[method], linestyle=styles.get(device_batch, "-"), label=label
        )
    ax.set_yscale("log")
    ax.set_xlabel("training step (global batch 32)")
    ax.set_ylabel("training loss (mean over seeds, log scale)")
    ax.set_title("Training loss: BatchNorm at b = 2, 8, 32 vs GroupNorm")
    ax.legend(fontsize=8)
    return fig


def _bar(ax: Axes, labels: list[str], samples: list[list[float]], colors: list[str]) -> None:
    stats = [mean_std(s) if s else (0.0, 0.0) for s in samples]
    xs = np.arange(len(labels))
    spread = [s for _, s in stats]
    ax.bar(xs, [m for m, _ in stats], yerr=spread if any(spread) else None, capsize=4, color=colors)
    ax.set_xticks(xs, labels, rotation=20, ha="right", fontsize=8)
    for x, (m, s) in zip(xs, stats, strict=True):
        text = f"{m:.1f}" if m > 1.5 else f"{m:.3f}"
        ax.annotate(
            text,
            (float(x), m + s),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.margins(y=0.12)


def transfer(rows: Sequence[Row]) -> plt.Figure:
    def first(metric: str, method: str, scale: float = 100.0) -> list[float]:
        found = [v for (m, _b), v in values(rows, "transfer", metric).items() if m == method]
        return [scale * x for x in found[0]] if found else []

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), width_ratios=(3, 2))
    bars = [
        ("BatchNorm\n(running stats)", first("target_test_acc", "bn"), COLORS["bn"]),
        ("BatchNorm\n(stats re-estimated)", first("target_test_acc_recalibrated", "bn"), "salmon"),
        ("BatchNorm\n(stats frozen)", first("target_test_acc", "bn_frozen"), COLORS["bn_frozen"]),
        ("GroupNorm", first("target_test_acc", "gn"), COLORS["gn"]),
        ("GroupNorm + WS", first("target_test_acc", "gn_ws"), COLORS["gn_ws"]),
    ]
    _bar(left, [b[0] for b in bars], [b[1] for b in bars], [b[2] for b in bars])
    left.set_ylabel("accuracy % on digits 5-9 (mean ± std)")
    left.set_title("Fine-tuned on 20 images per class, 8 images per device")
    gaps = [
        ("on upstream data\n(digits 0-4)", first("stats_mismatch_source", "bn", 1.0), "grey"),
        ("on new data\n(digits 5-9)", first("stats_mismatch_target", "bn", 1.0), COLORS["bn"]),
    ]
    _bar(right, [g[0] for g in gaps], [g[1] for g in gaps], [g[2] for g in gaps])
    right.set_ylabel("|stored mean - actual mean| / actual std")
    right.set_title("BatchNorm's stored statistics, before fine-tuning")
    return fig


def timing(rows: Sequence[Row]) -> plt.Figure:
    cells: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row["experiment"] == "timing" and str(row["metric"]).endswith("_ms"):
            phase = str(row["metric"]).removesuffix("_ms")
            cells[(phase, str(row["batch"]))][str(row["method"])] = float(str(row["value"]))
    panels = sorted(cells, key=lambda k: (k[0] != "train", int(k[1])))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4.2), squeeze=False)
    axes[0][0].set_ylabel(f"median ms per call (CPU, {threads(rows)} thread(s))")
    for ax, (phase, batch) in zip(axes[0], panels, strict=True):
        by_method = cells[(phase, batch)]
        methods = [m for m in ("bn", "gn", "gn_ws", "gn_ws_folded") if m in by_method]
        _bar(
            ax,
            [LABELS[m] for m in methods],
            [[by_method[m]] for m in methods],
            [COLORS[m] for m in methods],
        )
        what = "forward + backward + SGD step" if phase == "train" else "inference forward"
        ax.set_title(f"{what}, batch {batch}", fontsize=10)
    fig.suptitle("What each normalization costs (same tiny ResNetV2, 32x32 inputs)")
    fig.tight_layout()
    return fig
