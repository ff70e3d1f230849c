"""The embedded default: `bitserve up` with nothing configured runs the whole loop by itself.

`bitserve up` runs as a subprocess with BITSERVE_HOME in a temp dir, a free port, and NO
database/broker URLs in its environment: SQLite, kombu's SQLAlchemy transport and the local
artifact store under BITSERVE_HOME. It supervises two Celery workers: "worker" on the train
queue and "ingest" on the ingest queue (an upload is ingested while a job trains). Then Ctrl-C
(SIGINT) must stop the API and both workers cleanly (exit 0, within seconds) and leave no
process behind.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.embedded import STOP_TIMEOUT_S, Up
from tests.e2e.loop import check_loop, run_loop
from tests.procs import alive, children, descendants

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


def worker_queues(pid: int) -> dict[int, str]:
    """The Celery workers among `pid`'s direct children: child pid -> its `-Q` queues."""
    found: dict[int, str] = {}
    for child in children(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue  # it exited meanwhile
        if "celery" in argv and "-Q" in argv:
            found[child] = argv[argv.index("-Q") + 1]
    return found


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    home = tmp_path / "home"
    process = Up(home)
    try:
        process.wait_ready()
        yield process
    finally:
        process.kill()  # only if the test did not stop it


def test_bitserve_up_runs_the_loop_and_stops_cleanly(up: Up, tmp_path: Path) -> None:
    out = up.log()
    assert f"API:     {up.url}" in out
    assert f"docs:    {up.url}/docs" in out
    assert f"data:    {up.home}" in out
    # First start: a global admin key in BITSERVE_HOME/admin.key (0600), and the signed-in
    # link for the web page, printed once.
    key_file = up.home / "admin.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().strip()
    assert key.startswith("bsk_") and len(key) == 4 + 20 + 1 + 43
    assert f"API key: {key_file}" in out
    assert out.count(key) == 1 and f"{up.url}/#key={key}" in out
    with httpx.Client(base_url=up.url, timeout=60) as anonymous:
        response = anonymous.get("/v1/datasets")
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")

    # Two supervised workers: the training one and the ingest one, each on its own queue.
    workers = worker_queues(up.proc.pid)
    assert sorted(workers.values()) == ["ingest", "train"], workers

    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=up.url, timeout=60, headers=headers) as client:
        assert client.get("/docs").status_code == 200
        result = run_loop(client, tmp_path)  # the upload is ingested: it waits for ready
    try:
        check_loop(result)
    except AssertionError:
        print(up.log()[-6000:])
        raise

    # Everything lives under BITSERVE_HOME: SQLite database, SQLite broker, artifact store.
    assert (up.home / "bitserve.db").is_file()
    assert (up.home / "broker.db").is_file()
    model_dir = up.home / "store" / "models" / result.model["id"]
    # The artifact, and the ONNX graph the gateway exported to serve it (the default runtime).
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "metadata.json",
        "model.onnx",
        "model.safetensors",
    ]
    # Ingested: the dataset's files are published, the uploaded archive is gone.
    assert (up.home / "store" / "datasets" / result.dataset["id"]).is_dir()
    assert not (up.home / "store" / "uploads" / result.dataset["id"]).exists()

    # The same two workers ran the whole loop: neither died and was restarted.
    assert worker_queues(up.proc.pid) == workers
    children = descendants(up.proc.pid)
    assert set(workers) <= children
    started = time.monotonic()
    up.proc.send_signal(signal.SIGINT)
    try:
        code = up.proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"bitserve up still running {STOP_TIMEOUT_S} s after SIGINT:\n{up.log()}")
    took = time.monotonic() - started
    assert code == 0, up.log()[-4000:]
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if alive(pid)], "child processes left behind"
    assert "bitserve: stopped" in up.log()
    print(f"bitserve up stopped {took:.1f} s after SIGINT")
