"""The output of benchmarks/serve_speed.py: the markdown table, the goals of issue 13 with
PASS/FAIL, and the --json record.

The goals are checked on bitserve's default configuration (`on/d0`: batching on, no queue
delay) against the LitServe peer measured in the same run:

    images/s at 16 in flight >= 2.0x LitServe's
    p99 at 16 in flight <= 500 ms
    no errors (every response 200 and equal to the direct Predictor's answer)
    p50 at 1 in flight <= 45 ms

A goal whose point was not measured (say, no --peer litserve, or no concurrency 16) is printed
as "not measured". The verdicts do not change the exit status (an error or a wrong answer
does: serve_speed.py stops at the first). The goal lines do not start with "|": gpu_check_parts.py reads every line
that does as a table row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serve_load import TOP_K, Point

DEFAULT_CONFIG = "on/d0"  # bitserve's defaults: predict_max_batch_size=32, delay 0 ms
LITSERVE = "litserve"
RATIO_GOAL = 2.0
P99_GOAL_MS = 500.0
P50_GOAL_MS = 45.0
LOADED, ALONE = 16, 1  # requests in flight for the throughput and the latency goals


@dataclass
class Goal:
    name: str
    measured: str
    passed: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "not measured"}[self.passed]


def goals(points: dict[tuple[str, int], Point]) -> list[Goal]:
    mine16 = points.get((DEFAULT_CONFIG, LOADED))
    peer16 = points.get((LITSERVE, LOADED))
    mine1 = points.get((DEFAULT_CONFIG, ALONE))
    out = []
    name = f"{DEFAULT_CONFIG} images/s at {LOADED} in flight >= {RATIO_GOAL:.1f}x litserve's"
    if mine16 and peer16:
        ratio = mine16.images_per_s / peer16.images_per_s
        measured = f"{mine16.images_per_s:.1f} vs {peer16.images_per_s:.1f} = {ratio:.2f}x"
        out.append(Goal(name, measured, ratio >= RATIO_GOAL))
    else:
        out.append(Goal(name, "-", None))
    name = f"{DEFAULT_CONFIG} p99 at {LOADED} in flight <= {P99_GOAL_MS:.0f} ms"
    if mine16:
        p99 = mine16.percentile(99)
        out.append(Goal(name, f"{p99:.1f} ms", p99 <= P99_GOAL_MS))
    else:
        out.append(Goal(name, "-", None))
    # serve_speed.py stops at the first error or wrong answer, so a run that reports is clean.
    total = sum(p.requests for p in points.values())
    out.append(Goal("no errors", f"0 of {total} timed responses", True))
    name = f"{DEFAULT_CONFIG} p50 at {ALONE} in flight <= {P50_GOAL_MS:.0f} ms"
    if mine1:
        p50 = mine1.percentile(50)
        out.append(Goal(name, f"{p50:.1f} ms", p50 <= P50_GOAL_MS))
    else:
        out.append(Goal(name, "-", None))
    return out


def header_line(
    args: argparse.Namespace, classes: int, cpu: str, torch_version: str, load: tuple[float, float]
) -> str:
    height, width = args.image_size
    return (
        f"{args.model} at {args.crop} px, {classes} classes, one {width}x{height} "
        f"{args.image_format.upper()} per request, {cpu}, {os.cpu_count()} CPUs, "
        f"torch {torch_version}, server torch threads {args.threads}, "
        f"{args.requests} timed requests per point in {args.rounds} alternated rounds, "
        f"load average {load[0]:.1f} -> {load[1]:.1f}"
    )


def print_report(
    args: argparse.Namespace,
    names: list[str],
    points: dict[tuple[str, int], Point],
    header: str,
) -> list[Goal]:
    print(f"\n{header}\n")
    peer = LITSERVE in names
    columns = [
        "config",
        "concurrency",
        "images/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "mean batch",
        "server CPU ms/image",
        "client CPU ms/image",
        "images/s vs off",
        *(["images/s vs litserve"] if peer else []),
    ]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for level in args.concurrency:
        off = points[("off", level)].images_per_s
        for name in names:
            p = points[(name, level)]
            cells = [
                name,
                str(level),
                f"{p.images_per_s:.1f}",
                f"{p.percentile(50):.1f}",
                f"{p.percentile(95):.1f}",
                f"{p.percentile(99):.1f}",
                f"{p.mean_batch:.2f}",
                f"{p.cpu_ms_per_image():.1f}",
                f"{p.cpu_ms_per_image(client=True):.1f}",
                f"{p.images_per_s / off:.2f}x",
            ]
            if peer:
                cells.append(f"{p.images_per_s / points[(LITSERVE, level)].images_per_s:.2f}x")
            print("| " + " | ".join(cells) + " |")
    total = sum(p.requests for p in points.values())
    print(f"\nall {total} timed responses were 200 and matched a direct Predictor (top-{TOP_K})")
    checked = goals(points)
    print("\nGoals (issue 13):")
    for goal in checked:
        print(f"- {goal.verdict}: {goal.name}: {goal.measured}")
    return checked


def write_json(
    path: Path,
    args: argparse.Namespace,
    names: list[str],
    points: dict[tuple[str, int], Point],
    header: str,
    checked: list[Goal],
) -> None:
    rows: list[dict[str, Any]] = []
    for level in args.concurrency:
        for name in names:
            p = points[(name, level)]
            rows.append(
                {
                    "config": name,
                    "concurrency": level,
                    "requests": p.requests,
                    "images_per_s": p.images_per_s,
                    "p50_ms": p.percentile(50),
                    "p95_ms": p.percentile(95),
                    "p99_ms": p.percentile(99),
                    "mean_batch": None if math.isnan(p.mean_batch) else p.mean_batch,
                    "server_cpu_ms_per_image": p.cpu_ms_per_image(),
                    "client_cpu_ms_per_image": p.cpu_ms_per_image(client=True),
                }
            )
    record = {
        "header": header,
        "options": {k: v for k, v in vars(args).items() if not k.startswith("serve_")},
        "rows": rows,
        "goals": [{**asdict(g), "verdict": g.verdict} for g in checked],
    }
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
