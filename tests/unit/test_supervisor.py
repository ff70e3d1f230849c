"""`bitserve up`'s process supervision (service.supervisor): the restart policy on a fake clock,
and the Supervisor on real child processes, down to /readyz naming a crash-looping worker."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.supervisor import ChildDown, RestartPolicy, Supervisor

CRASH = [sys.executable, "-c", "import sys; sys.exit(3)"]
SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]
CRASH_AFTER_1S = [sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit(3)"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_up_to_the_cap_and_resets_after_a_stable_run() -> None:
    clock = FakeClock()
    policy = RestartPolicy(
        first_delay=1, max_delay=8, stable_after=60, loop_limit=100, loop_window=300, clock=clock
    )
    delays = []
    for _ in range(6):
        policy.started()
        clock.now += 2  # dies 2 s after each start
        delays.append(policy.exited())
        clock.now += delays[-1]
    assert delays == [1, 2, 4, 8, 8, 8]
    policy.started()
    clock.now += 61  # ran long enough: the next exit is a fresh start
    assert policy.exited() == 1
    policy.started()
    clock.now += 1
    assert policy.exited() == 2


def test_crash_loop_after_the_limit_within_the_window_and_until_a_stable_run() -> None:
    clock = FakeClock()
    policy = RestartPolicy(
        first_delay=1, max_delay=30, stable_after=60, loop_limit=3, loop_window=100, clock=clock
    )
    for _ in range(2):
        policy.started()
        clock.now += 1
        policy.exited()
    assert not policy.crash_loop and policy.recent_exits == 0
    policy.started()
    clock.now += 1
    assert policy.exited() == 30  # the third exit within 100 s: a loop, retried at the cap
    assert policy.crash_loop and policy.recent_exits == 3
    clock.now += 101  # no exit for longer than the window: the old exits no longer count
    assert not policy.crash_loop
    for _ in range(3):
        policy.started()
        clock.now += 1
        policy.exited()
    assert policy.crash_loop
    policy.started()
    clock.now += 59
    assert policy.crash_loop  # up, but not long enough yet
    clock.now += 1
    assert not policy.crash_loop  # stable: the loop is over, the backoff starts over
    assert policy.exited() == 1


def fast_policy(loop_limit: int = 3) -> Callable[[], RestartPolicy]:
    return lambda: RestartPolicy(
        first_delay=0.05, max_delay=0.2, stable_after=30, loop_limit=loop_limit, loop_window=60
    )


def poll_until(supervisor: Supervisor, done: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        supervisor.poll()
        if done():
            return
        time.sleep(0.02)
    raise AssertionError(f"not reached in {timeout} s: {supervisor.children}")


def test_a_crashing_child_is_restarted_and_reported_as_a_crash_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor(policy=fast_policy(loop_limit=3))
    supervisor.start("worker", CRASH, {})
    check = supervisor.readiness_checks()["worker"]
    try:
        with caplog.at_level("WARNING", logger="service.supervisor"):
            poll_until(supervisor, lambda: supervisor.children["worker"].restarts >= 4)
        child = supervisor.children["worker"]
        assert child.last_exit == 3
        problem = supervisor.problems()["worker"]
        assert problem.startswith("the worker process is crash-looping: it exited")
        assert "last exit code 3" in problem
        with pytest.raises(ChildDown, match="crash-looping"):
            check()
        messages = [r.getMessage() for r in caplog.records]
        assert "bitserve: restarting the worker (restart 1)" in messages
        assert any(
            "exited unexpectedly (exit code 3); restarting it in 0.05 s" in m for m in messages
        )
        assert any("crash-looping" in m for m in messages)
    finally:
        supervisor.stop(5)
    # Stopped: nothing is started again, however long it is polled.
    restarts = supervisor.children["worker"].restarts
    time.sleep(0.3)
    supervisor.poll()
    assert supervisor.children["worker"].restarts == restarts
    assert supervisor.pids() == {"worker": None}


def test_a_running_child_is_stopped_and_never_reported(tmp_path: Path) -> None:
    supervisor = Supervisor(policy=fast_policy())
    supervisor.start("worker", SLEEP, {})
    supervisor.poll()
    pid = supervisor.pids()["worker"]
    assert pid is not None and supervisor.problems() == {}
    supervisor.readiness_checks()["worker"]()  # no exception: ready
    started = time.monotonic()
    supervisor.stop(5)
    assert time.monotonic() - started < 5  # SIGTERM was enough
    assert supervisor.children["worker"].restarts == 0


def test_readyz_names_a_crash_looping_worker(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    supervisor = Supervisor(policy=fast_policy(loop_limit=2))
    app = create_app(settings)
    app.state.supervisor = supervisor
    supervisor.start("worker", CRASH_AFTER_1S, {})
    try:
        with TestClient(app, base_url="http://localhost") as client:
            assert client.get("/readyz").status_code == 200  # up (for a second)
            poll_until(supervisor, lambda: bool(supervisor.problems()))
            response = client.get("/readyz")
            assert client.get("/healthz").status_code == 200  # the API itself is fine
    finally:
        supervisor.stop(5)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    error = response.json()["error"]
    assert error["code"] == "not_ready"
    assert list(error["details"]["failing"]) == ["worker"]
    assert error["details"]["failing"]["worker"].startswith(
        "ChildDown: the worker process is crash-looping: it exited 2 times within 60 s"
    )


def test_a_child_that_cannot_be_started_again_is_retried_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = Supervisor(policy=fast_policy(loop_limit=3))
    supervisor.start("worker", CRASH, {})
    supervisor.children["worker"].command = [str(tmp_path / "no-such-program")]
    try:
        with caplog.at_level("ERROR", logger="service.supervisor"):
            poll_until(supervisor, lambda: supervisor.children["worker"].restarts >= 3)
        assert "worker" in supervisor.problems()  # the failed starts count as exits
        assert any("could not start the worker" in r.getMessage() for r in caplog.records)
    finally:
        supervisor.stop(5)
