"""Issue 11's load check, small: benchmarks/connections.py against a real `bitserve api` child
process (embedded SQLite and broker), 200 idle connections and 100 job event streams held
open; /healthz and GET /v1/datasets must stay under 100 ms at the 95th percentile, with no
error, no stream dropped and every connection held. The full run (2,000 + 1,000) is in
benchmarks/RESULTS.md, "Connections and streams".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "connections.py"
P95_LIMIT_MS = 100.0


def test_idle_connections_and_streams_leave_healthz_and_listing_fast() -> None:
    command = [sys.executable, str(SCRIPT), "--idle", "200", "--streams", "100", "--jobs", "4"]
    command += ["--probes", "60", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=170, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert result["held_at_start"] == {"idle_open": 200, "streams_open": 100}
    assert result["held_at_end"] == {"idle_open": 200, "streams_open_after": 100}
    assert (result["streams_dropped"], result["stream_error_count"]) == (0, 0)
    for path, row in result["loaded"].items():
        assert row["errors"] == [], path
        assert row["p95_ms"] < P95_LIMIT_MS, (path, row)
    # Every connection is a descriptor in the server, and nothing more per stream.
    assert 300 <= result["server"]["open_fds"] - result["baseline_server"]["open_fds"] < 400
