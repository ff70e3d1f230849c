"""Run the normalization experiment; write a CSV of every run, a summary and the figures.

    python -m experiments.normalization.run            # full: docs/normalization_runs.csv, ...
    python -m experiments.normalization.run --quick --out-dir /tmp/x   # seconds, for tests

Three experiments (see docs/normalization.md for what they show):
- main: each network trained from scratch on digits with the same global batch; BatchNorm
  networks simulate devices of b images (ChunkedBatchNorm2d). GroupNorm networks do not depend
  on how the batch is split (their per-image maths and DDP's gradient average are the same for
  any split), so they are trained once per seed.
- transfer: pre-train on digits 0-4, fine-tune a zero-initialised head plus the whole network on
  a few images of digits 5-9, as BiT transfers; BatchNorm also with frozen statistics.
- timing: forward + backward and inference time of the same network with BN, GN, GN + WS.
"""

from __future__ import annotations

import argparse
import copy
import csv
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from experiments.normalization import data, figures, summary, timing
from experiments.normalization.train import (
    METHODS,
    TrainConfig,
    accuracy,
    batch_stats_accuracy,
    build_model,
    recalibrate,
    stats_mismatch,
    train,
)

COLUMNS = ("experiment", "method", "device_batch", "batch", "seed", "step", "metric", "value")
CSV_NAME = "normalization_runs.csv"
SUMMARY_NAME = "normalization_summary.md"
FIGURES_DIR = "figures"
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)

Row = dict[str, object]


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...]
    device_batches: tuple[int, ...]  # for BatchNorm
    ws_device_batches: tuple[int, ...]  # for BatchNorm + WS (fewer: it is the extra)
    main: TrainConfig
    pretrain: TrainConfig
    finetune: TrainConfig
    transfer_device_batch: int  # BiT's 8 images per chip
    shots: int  # target training images per class
    timing_repeats: int  # calls per method per round
    timing_rounds: int  # independent rounds: the spread between them is the error bar
    timing_infer_batches: tuple[int, ...]
    timing_warmup: int = 3
    max_images: int | None = None  # keep only the first images of each split (quick mode)


FULL = Settings(
    seeds=(0, 1, 2),
    device_batches=(1, 2, 4, 8, 16, 32),
    ws_device_batches=(2, 8, 32),
    main=TrainConfig(steps=200, global_batch=32, lr=0.05),
    pretrain=TrainConfig(steps=150, global_batch=32, lr=0.05),
    finetune=TrainConfig(steps=80, global_batch=32, lr=0.01),
    transfer_device_batch=8,
    shots=20,
    timing_repeats=30,
    timing_rounds=7,
    timing_infer_batches=(1, 32),
)

QUICK = replace(
    FULL,
    seeds=(0,),
    device_batches=(2, 32),
    ws_device_batches=(2,),
    main=replace(FULL.main, steps=4, log_every=2),
    pretrain=replace(FULL.pretrain, steps=3),
    finetune=replace(FULL.finetune, steps=3),
    timing_repeats=2,
    timing_rounds=2,
    timing_warmup=1,
    max_images=320,
)


def _row(experiment: str, method: str, metric: str, value: float, **keys: object) -> Row:
    row: Row = dict.fromkeys(COLUMNS, "")
    row.update(experiment=experiment, method=method, metric=metric, value=value, **keys)
    return row


def main_experiment(settings: Settings, train_set: data.Split, test_set: data.Split) -> list[Row]:
    runs: list[tuple[str, int | None]] = [("bn", b) for b in settings.device_batches]
    runs += [("bn_ws", b) for b in settings.ws_device_batches]
    runs += [("gn", None), ("gn_ws", None)]
    rows: list[Row] = []
    for seed in settings.seeds:
        for key, device_batch in runs:
            torch.manual_seed(seed)
            model = build_model(METHODS[key], 10, device_batch or settings.main.global_batch)
            start = time.perf_counter()
            curve = train(model, train_set, settings.main, seed)
            keys = {
                "device_batch": device_batch if device_batch is not None else "",
                "batch": settings.main.global_batch,
                "seed": seed,
            }
            rows += [_row("main", key, "train_loss", loss, step=s, **keys) for s, loss in curve]
            final = {
                "seconds": time.perf_counter() - start,
                "final_train_loss": curve[-1][1],
                "test_acc": accuracy(model, test_set),
                "test_acc_batch_stats": batch_stats_accuracy(model, test_set, seed),
            }
            step = curve[-1][0]
            rows += [_row("main", key, m, v, step=step, **keys) for m, v in final.items()]
            print(f"main {key:6} b={device_batch!s:4} seed={seed} acc={final['test_acc']:.4f}")
    return rows


def transfer_experiment(
    settings: Settings, train_set: data.Split, test_set: data.Split
) -> list[Row]:
    source_train = data.classes(train_set, SOURCE_CLASSES)
    source_test = data.classes(test_set, SOURCE_CLASSES)
    target_train = data.classes(train_set, TARGET_CLASSES, per_class=settings.shots)
    target_test = data.classes(test_set, TARGET_CLASSES)
    b = settings.transfer_device_batch
    rows: list[Row] = []
    for seed in settings.seeds:
        for key in ("bn", "gn", "gn_ws"):
            torch.manual_seed(seed)
            upstream = build_model(METHODS[key], len(SOURCE_CLASSES), b)
            train(upstream, source_train, settings.pretrain, seed)
            keys = {
                "device_batch": b if key == "bn" else "",
                "batch": settings.finetune.global_batch,
                "seed": seed,
            }
            rows.append(
                _row("transfer", key, "source_test_acc", accuracy(upstream, source_test), **keys)
            )
            variants = [(key, False), ("bn_frozen", True)] if key == "bn" else [(key, False)]
            if key == "bn":
                # How stale the upstream running statistics are before any fine-tuning.
                for name, split in (("source", source_test), ("target", target_test)):
                    gap = stats_mismatch(upstream, split)
                    rows.append(_row("transfer", key, f"stats_mismatch_{name}", gap, **keys))
            for name, freeze in variants:
                model = copy.deepcopy(upstream)
                model.reset_head(len(TARGET_CLASSES), zero=True)  # BiT: zero-initialised head
                train(model, target_train, settings.finetune, seed, freeze_bn=freeze)
                metrics = {
                    "target_test_acc": accuracy(model, target_test),
                    "target_test_acc_batch_stats": batch_stats_accuracy(model, target_test, seed),
                }
                if key == "bn":
                    metrics["stats_mismatch_after"] = stats_mismatch(model, target_test)
                    recalibrate(model, target_train)
                    metrics["target_test_acc_recalibrated"] = accuracy(model, target_test)
                rows += [_row("transfer", name, m, v, **keys) for m, v in metrics.items()]
                print(f"transfer {name:9} seed={seed} acc={metrics['target_test_acc']:.4f}")
    return rows


def timing_experiment(settings: Settings) -> list[Row]:
    measured = timing.measure(
        data.IMAGE_SIZE,
        settings.main.global_batch,
        settings.timing_infer_batches,
        settings.timing_repeats,
        settings.timing_warmup,
        settings.timing_rounds,
    )
    rows = [
        _row(
            "timing",
            str(m["method"]),
            f"{m['phase']}_ms",
            float(m["ms"]),  # type: ignore[arg-type]
            batch=m["batch"],
            step=m["round"],
        )
        for m in measured
    ]
    rows.append(_row("timing", "", "torch_threads", float(torch.get_num_threads())))
    return rows


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            value = row["value"]
            writer.writerow({**row, "value": f"{value:.6g}" if isinstance(value, float) else value})


def read_csv(path: Path) -> list[Row]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def run(settings: Settings, out_dir: Path, threads: int = 1) -> Path:
    """Run everything, write CSV, summary and figures under out_dir; returns the CSV path.

    One thread by default: on a 2-core machine shared with other work, two OpenMP threads wait
    on each other whenever one is descheduled (see the README).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train_set, test_set = data.load()
        if settings.max_images is not None:
            keep = torch.arange(settings.max_images)
            train_set, test_set = train_set.subset(keep), test_set.subset(keep)
        rows = main_experiment(settings, train_set, test_set)
        rows += transfer_experiment(settings, train_set, test_set)
        rows += timing_experiment(settings)
    finally:
        torch.set_num_threads(previous)
    csv_path = out_dir / CSV_NAME
    write_csv(rows, csv_path)
    report_from_csv(csv_path, out_dir)
    return csv_path


def rerun_timing(settings: Settings, out_dir: Path, threads: int = 1) -> Path:
    """Replace only the timing rows of an existing CSV (accuracy runs are deterministic and slow;
    timings are what a quieter machine would want to measure again)."""
    csv_path = out_dir / CSV_NAME
    kept = [row for row in read_csv(csv_path) if row["experiment"] != "timing"]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = kept + timing_experiment(settings)
    finally:
        torch.set_num_threads(previous)
    write_csv(rows, csv_path)
    report_from_csv(csv_path, out_dir)
    return csv_path


def report_from_csv(csv_path: Path, out_dir: Path) -> None:
    """Summary and figures from the CSV alone, so the docs can always be regenerated from it."""
    rows = read_csv(csv_path)
    (out_dir / SUMMARY_NAME).write_text(summary.markdown(rows))
    figures.write_all(rows, out_dir / FIGURES_DIR)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, one seed (tests)")
    parser.add_argument("--out-dir", type=Path, default=Path("docs"), help="default: docs/")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--from-csv", action="store_true", help="only redraw summary + figures from the CSV"
    )
    parser.add_argument(
        "--timing-only", action="store_true", help="rerun only the timing rows of the CSV"
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.timing_only:
        print(f"wrote {rerun_timing(settings, args.out_dir, args.threads)}")
        return
    if args.from_csv:
        report_from_csv(args.out_dir / CSV_NAME, args.out_dir)
        return
    start = time.perf_counter()
    csv_path = run(settings, args.out_dir, args.threads)
    print(f"wrote {csv_path} and figures in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
