"""benchmarks/serve_speed.py with the LitServe peer (issue 13), run for real on the tiny model.

`--quick --peer litserve` starts bitserve's servers and a LitServe server (benchmarks/
serve_peers.py) on loopback sockets, drives them with JPEG requests, checks every answer
against a direct Predictor and prints the table with the litserve rows and the goals block.
The goal verdicts themselves are checked on fixed figures (serve_report.goals).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "serve_speed.py"
sys.path.insert(0, str(SCRIPT.parent))  # the benchmark modules import each other by name

from serve_load import Point  # noqa: E402
from serve_report import goals  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def _peer_processes() -> list[int]:
    """Live processes started from this checkout's serve_peers.py (LitServe and its children
    carry that command line)."""
    script = str(ROOT / "benchmarks" / "serve_peers.py").encode()
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if script in fh.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def test_quick_run_with_the_litserve_peer(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    command = [
        sys.executable,
        str(SCRIPT),
        *("--model", "tiny-R10x0.25", "--crop", "32", "--quick", "--peer", "litserve"),
        *("--delays", "0", "--concurrency", "1", "16"),
        *("--image-format", "jpeg", "--image-size", "48", "--json", str(out)),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=200, env=env, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    table = [line for line in lines if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[-2:] == ["images/s vs off", "images/s vs litserve"]
    rows = [
        dict(zip(header, (c.strip() for c in r.strip("|").split("|")), strict=True))
        for r in table[2:]
    ]
    assert [(r["config"], r["concurrency"]) for r in rows] == [
        ("off", "1"),
        ("on/d0", "1"),
        ("litserve", "1"),
        ("off", "16"),
        ("on/d0", "16"),
        ("litserve", "16"),
    ]
    litserve1, litserve16 = rows[2], rows[5]
    assert litserve1["images/s vs litserve"] == litserve16["images/s vs litserve"] == "1.00x"
    assert litserve1["mean batch"] == "1.00"  # one request in flight: nothing to batch
    assert 1.0 <= float(litserve16["mean batch"]) <= 16.0  # LitServe's max_batch_size
    assert all(float(r["images/s"]) > 0 and float(r["server CPU ms/image"]) > 0 for r in rows)
    assert "one 48x48 JPEG per request" in done.stdout
    assert "all 120 timed responses were 200 and matched a direct Predictor (top-5)" in lines

    block = lines[lines.index("Goals (issue 13):") + 1 :]
    assert [line.split(": ")[1] for line in block] == [
        "on/d0 images/s at 16 in flight >= 2.0x litserve's",
        "on/d0 p99 at 16 in flight <= 500 ms",
        "no errors",
        "on/d0 p50 at 1 in flight <= 45 ms",
    ]
    assert all(line.startswith(("- PASS: ", "- FAIL: ")) for line in block)
    assert block[2] == "- PASS: no errors: 0 of 120 timed responses"

    record = json.loads(out.read_text(encoding="utf-8"))
    assert [(r["config"], r["concurrency"]) for r in record["rows"]] == [
        (r["config"], int(r["concurrency"])) for r in rows
    ]
    assert [f"- {g['verdict']}: {g['name']}: {g['measured']}" for g in record["goals"]] == block
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # nothing else written
    assert _peer_processes() == []  # LitServe's worker, queue manager and API server are gone


def _point(config: str, concurrency: int, seconds: float, latencies_ms: list[float]) -> Point:
    return Point(config, concurrency, len(latencies_ms), seconds, [t / 1000 for t in latencies_ms])


def test_goal_verdicts_on_fixed_figures() -> None:
    points = {
        # 100 requests in 2.5 s = 40 images/s; p99 of 1..100 ms (inclusive method) = 99.01 ms
        ("on/d0", 16): _point("on/d0", 16, 2.5, [float(t) for t in range(1, 101)]),
        ("litserve", 16): _point("litserve", 16, 5.0, [1.0] * 100),  # 20 images/s
        ("on/d0", 1): _point("on/d0", 1, 1.0, [44.0, 46.0, 45.0]),  # p50 45 ms
    }
    checked = goals(points)
    assert [(g.verdict, g.measured) for g in checked] == [
        ("PASS", "40.0 vs 20.0 = 2.00x"),
        ("PASS", "99.0 ms"),
        ("PASS", "0 of 203 timed responses"),
        ("PASS", "45.0 ms"),
    ]
    points[("litserve", 16)] = _point("litserve", 16, 4.9, [1.0] * 100)  # 20.4 images/s
    points[("on/d0", 1)] = _point("on/d0", 1, 1.0, [45.5, 46.0, 45.0])
    assert [g.verdict for g in goals(points)] == ["FAIL", "PASS", "PASS", "FAIL"]
    del points[("litserve", 16)]
    assert goals(points)[0].verdict == "not measured"
