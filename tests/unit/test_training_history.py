"""bitcore.train.history: bounded curves, resume, CSV; bitcore.curves: the files and the PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitcore.curves import draw_png, write_curves
from bitcore.hyperrule import plan
from bitcore.train.callbacks import Progress
from bitcore.train.history import TrainingHistory, validation_steps


def _report(step: int, total: int = 20_000, loss: float | None = 1.0) -> Progress:
    return Progress(step, total, loss, 0.003, 100.0, 1.0, "training")


def test_twenty_thousand_steps_stay_within_the_bound_on_a_uniform_stride() -> None:
    history = TrainingHistory(max_points=500)
    for step in range(1, 20_001):
        history.add_progress(_report(step, loss=1.0 / step))
    steps = [p["step"] for p in history.training]
    assert history.stride == 64  # 20,000 / 64 = 312 points; stride 32 would keep 625
    assert steps == [*range(64, 20_001, 64), 20_000]
    assert len(steps) == 313 <= 500
    assert history.training[-1]["loss"] == pytest.approx(1.0 / 20_000)


def test_the_newest_report_is_kept_until_a_newer_one_arrives() -> None:
    history = TrainingHistory(max_points=4)
    for step in range(1, 8):
        history.add_progress(_report(step, total=100))
    assert [p["step"] for p in history.training] == [2, 4, 6, 7]
    history.add_progress(_report(8, total=100))  # 7 is off the stride: replaced, not kept
    assert [p["step"] for p in history.training] == [2, 4, 6, 8]
    history.add_progress(_report(9, total=100))  # 5 points > 4: the stride doubles
    assert [p["step"] for p in history.training] == [4, 8, 9]
    assert history.stride == 4


def test_a_resume_drops_the_steps_that_are_run_again() -> None:
    history = TrainingHistory()
    for step in range(1, 31):
        history.add_progress(_report(step, loss=float(step)))
    history.add_validation(10, 0.5, 1.5)
    history.add_validation(25, 0.7, 0.9)
    history.add_progress(_report(21, loss=-1.0))  # resumed from the checkpoint at step 20
    assert [p["step"] for p in history.training] == list(range(1, 22))
    assert history.training[-1]["loss"] == -1.0
    assert history.validation == [{"step": 10, "accuracy": 0.5, "loss": 1.5}]


def test_other_phases_and_non_finite_values() -> None:
    history = TrainingHistory()
    history.add_progress(Progress(0, 10, None, 0.0, 0.0, None, "preparing"))
    history.add_progress(Progress(10, 10, 0.5, 0.0, 0.0, None, "evaluating"))
    history.add_progress(_report(1, total=10, loss=float("nan")))
    history.add_validation(5, 0.25, float("inf"))
    assert history.training == [{"step": 1, "loss": None, "lr": 0.003, "images_per_second": 100.0}]
    assert history.validation == [{"step": 5, "accuracy": 0.25, "loss": None}]
    json.dumps(history.to_dict(), allow_nan=False)  # JSON without NaN


def test_round_trip_and_csv_rows_merge_training_and_validation() -> None:
    history = TrainingHistory()
    for step in (1, 2, 3):
        history.add_progress(_report(step, total=3, loss=step / 4))
    history.add_validation(2, 0.5, 0.75)
    history.add_validation(3, 1.0, 0.125)
    assert TrainingHistory.from_dict(history.to_dict()) == history
    assert TrainingHistory.from_dict(None) == TrainingHistory()
    assert history.to_csv() == (
        "step,loss,lr,images_per_second,val_accuracy,val_loss\n"
        "1,0.25,0.003,100.0,,\n"
        "2,0.5,0.003,100.0,0.5,0.75\n"
        "3,0.75,0.003,100.0,1.0,0.125\n"
    )
    with pytest.raises(ValueError, match="max_points must be >= 2"):
        TrainingHistory(max_points=1)


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (7, ()),
        (8, (2, 4, 6)),
        (12, (3, 6, 9)),
        (500, (125, 250, 375)),
        (10_000, (2500, 5000, 7500)),
    ],
)
def test_validation_steps(total: int, expected: tuple[int, ...]) -> None:
    assert validation_steps(total) == expected


def test_curve_files(tmp_path: Path) -> None:
    schedule = plan(5_000, (300, 300))  # 500 steps, warm-up 100, decays 200/300/400
    history = TrainingHistory()
    for step in range(1, 501):
        history.add_progress(_report(step, total=500, loss=2.0 / step))
    history.add_validation(250, 0.8, 0.6)
    paths = write_curves(history, schedule, tmp_path)
    assert [p.name for p in paths] == ["curves.json", "curves.csv", "curves.png"]
    document = json.loads(paths[0].read_text())
    assert document["schedule"] == {
        "warmup_steps": schedule.warmup_steps,
        "decay_steps": list(schedule.decay_steps),
        "total_steps": 500,
    }
    assert len(document["training"]) == 500 and document["stride"] == 1
    assert paths[1].read_text().count("\n") == 501
    png = paths[2].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert draw_png(TrainingHistory(), schedule)[:8] == b"\x89PNG\r\n\x1a\n"  # empty: still drawn
    assert oct(paths[0].stat().st_mode & 0o777) == "0o600"
