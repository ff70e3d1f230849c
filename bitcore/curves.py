"""A fine-tune's curves as files next to its artifact: curves.json, curves.csv, curves.png.

`python -m bitcore finetune` writes them (the service serves the same history per job as
GET /v1/jobs/{id}/metrics). The PNG has three panels sharing the step axis: training loss with
the validation loss at the evaluation points, validation accuracy, and the learning rate; the
end of the warm-up and each decay of the HyperRule schedule are marked on all three.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitcore.atomic import atomic_write, write_json_atomic
from bitcore.hyperrule import Plan
from bitcore.train.history import TrainingHistory

JSON_FILE = "curves.json"
CSV_FILE = "curves.csv"
PNG_FILE = "curves.png"


def schedule_of(plan: Plan) -> dict[str, Any]:
    return {
        "warmup_steps": plan.warmup_steps,
        "decay_steps": list(plan.decay_steps),
        "total_steps": plan.total_steps,
    }


def write_curves(history: TrainingHistory, plan: Plan, out_dir: str | Path) -> list[Path]:
    """Write the three files into out_dir (atomically, each); returns their paths."""
    out = Path(out_dir)
    document = {"schedule": schedule_of(plan), **history.to_dict()}
    paths = [out / JSON_FILE, out / CSV_FILE, out / PNG_FILE]
    write_json_atomic(paths[0], document, indent=1)
    for path, content in (
        (paths[1], history.to_csv().encode()),
        (paths[2], draw_png(history, plan)),
    ):
        with atomic_write(path) as tmp:
            tmp.write_bytes(content)
    return paths


def draw_png(history: TrainingHistory, plan: Plan) -> bytes:
    """The curves as a PNG (matplotlib, drawn off-screen)."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or used
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 6.5), layout="constrained")
    loss_ax, acc_ax, lr_ax = figure.subplots(3, 1, sharex=True, height_ratios=(3, 2, 1.4))
    steps = [p["step"] for p in history.training]
    loss_ax.plot(steps, [_nan(p["loss"]) for p in history.training], label="training loss")
    val_steps = [p["step"] for p in history.validation]
    if history.validation:
        loss_ax.plot(
            val_steps,
            [_nan(p["loss"]) for p in history.validation],
            "o-",
            label="validation loss",
        )
        acc_ax.plot(
            val_steps,
            [100 * _nan(p["accuracy"]) for p in history.validation],
            "o-",
            color="tab:green",
        )
    loss_ax.set_ylabel("loss")
    loss_ax.legend(loc="upper right", fontsize=8)
    acc_ax.set_ylabel("validation\naccuracy (%)")
    lr_ax.plot(steps, [_nan(p["lr"]) for p in history.training], color="tab:gray")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel(f"optimizer step (batch {plan.batch_size})")
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.axvline(plan.warmup_steps, color="tab:orange", linestyle=":", linewidth=1)
        for step in plan.decay_steps:
            ax.axvline(step, color="tab:red", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
    loss_ax.set_title(
        "Training curves (dotted: end of warm-up in orange, learning-rate decays in red)",
        fontsize=10,
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _nan(value: float | None) -> float:
    """A missing value (null: not yet known, or a diverged loss) draws as a gap."""
    return float("nan") if value is None else float(value)
