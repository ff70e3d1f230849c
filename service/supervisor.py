"""The child processes of `bitserve up`, kept running like a process manager would.

Training is the risky part of the service (a job that asks for too much memory gets its process
killed by the kernel), and it must never take serving down. So a child that exits on its own is
started again after a pause that doubles with each quick exit (RestartPolicy), and the API keeps
answering meanwhile; the job the dead worker held is re-queued by the new worker's reconciler
(worker.reconciler) and resumes from its checkpoint. A child that keeps dying is a crash loop:
it is still restarted (every `max_delay` seconds, in case the cause goes away) and reported in
the log and by /readyz (`failing: {"worker": ...}`), never by stopping the API.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class RestartPolicy:
    """When to start a child again after it exited on its own.

    The pause is `first_delay`, doubled after every exit up to `max_delay`; a child that ran
    `stable_after` seconds before it exited starts over at `first_delay` (one crash a day is no
    loop). `loop_limit` exits within `loop_window` seconds make a crash loop, which ends once
    the child has run `stable_after` seconds again.
    """

    def __init__(
        self,
        *,
        first_delay: float = 1.0,
        max_delay: float = 30.0,
        stable_after: float = 60.0,
        loop_limit: int = 5,
        loop_window: float = 300.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.first_delay, self.max_delay, self.stable_after = first_delay, max_delay, stable_after
        self.loop_limit, self.loop_window, self.clock = loop_limit, loop_window, clock
        self._next_delay = first_delay
        self._exits: deque[float] = deque()
        self._started_at: float | None = None

    def started(self) -> None:
        self._started_at = self.clock()

    def exited(self) -> float:
        """Record an exit; returns the pause before the next start."""
        now = self.clock()
        self._forget_if_stable(now)
        self._started_at = None
        self._exits.append(now)
        delay = self.max_delay if self.crash_loop else self._next_delay
        self._next_delay = min(self._next_delay * 2, self.max_delay)
        return delay

    @property
    def crash_loop(self) -> bool:
        now = self.clock()
        self._forget_if_stable(now)
        while self._exits and self._exits[0] < now - self.loop_window:
            self._exits.popleft()
        return len(self._exits) >= self.loop_limit

    @property
    def recent_exits(self) -> int:
        return len(self._exits) if self.crash_loop else 0

    def _forget_if_stable(self, now: float) -> None:
        if self._started_at is not None and now - self._started_at >= self.stable_after:
            self._next_delay = self.first_delay
            self._exits.clear()


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    policy: RestartPolicy
    proc: subprocess.Popen[bytes] | None = None
    restart_at: float | None = None  # set while it waits for its restart
    restarts: int = 0
    last_exit: int | None = None


class ChildDown(RuntimeError):
    """A supervised child is crash-looping (raised by the readiness check)."""


class Supervisor:
    """Starts, watches (`poll`, called every fraction of a second), restarts and stops children.

    Thread-safe: `poll` runs in the watcher thread, `stop`/`kill` in the main thread (signal
    handlers); once stopping, nothing is started again.
    """

    def __init__(
        self,
        policy: Callable[[], RestartPolicy] = RestartPolicy,
        clock: Clock = time.monotonic,
    ) -> None:
        self.children: dict[str, Child] = {}
        self.stopping = False
        self._policy, self._clock = policy, clock
        self._lock = threading.RLock()

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        with self._lock:
            child = Child(name, command, env, self._policy())
            self.children[name] = child
            self._spawn(child)

    def poll(self) -> None:
        """Notice children that exited and start those whose pause is over."""
        with self._lock:
            if self.stopping:
                return
            now = self._clock()
            for child in self.children.values():
                if child.proc is not None and (code := child.proc.poll()) is not None:
                    self._exited(child, code, now)
                if child.restart_at is not None and now >= child.restart_at:
                    child.restart_at = None
                    child.restarts += 1
                    log.warning(
                        "bitserve: restarting the %s (restart %d)", child.name, child.restarts
                    )
                    try:
                        self._spawn(child)
                    except OSError as exc:  # e.g. no memory for a fork: counts as an exit
                        child.restart_at = now + child.policy.exited()
                        log.error("bitserve: could not start the %s: %s", child.name, exc)

    def problems(self) -> dict[str, str]:
        """Crash-looping children, described (for /readyz and the log)."""
        with self._lock:
            return {
                child.name: self._describe_loop(child)
                for child in self.children.values()
                if child.policy.crash_loop
            }

    def readiness_checks(self) -> dict[str, Callable[[], None]]:
        """One check per child for /readyz: raises ChildDown while it is crash-looping."""

        def check(name: str) -> Callable[[], None]:
            def run() -> None:
                problem = self.problems().get(name)
                if problem is not None:
                    raise ChildDown(problem)

            return run

        return {name: check(name) for name in self.children}

    def pids(self) -> dict[str, int | None]:
        with self._lock:
            return {
                name: child.proc.pid
                if child.proc is not None and child.proc.poll() is None
                else None
                for name, child in self.children.items()
            }

    def terminate(self) -> None:
        """SIGTERM every child still running (Celery: warm shutdown); does not wait."""
        with self._lock:
            self.stopping = True
            for proc in self._running():
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()

    def stop(self, grace: float) -> None:
        self.terminate()
        deadline = time.monotonic() + grace
        for child in list(self.children.values()):
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()

    def kill(self) -> None:
        with self._lock:
            self.stopping = True
            for proc in self._running():
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    # -- inside the lock ------------------------------------------------------------------

    def _spawn(self, child: Child) -> None:
        # Own session: a terminal's Ctrl-C reaches only us, and we stop the children in order.
        # PDEATHSIG: if we are killed outright (SIGKILL), the kernel still stops the children.
        # (It follows the thread that started the child: restarts run in `bitserve up`'s
        # watcher thread, which ends only when everything stops anyway.)
        child.proc = subprocess.Popen(
            child.command, env=child.env, start_new_session=True, preexec_fn=_die_with_parent
        )
        child.policy.started()

    def _exited(self, child: Child, code: int, now: float) -> None:
        child.proc, child.last_exit = None, code
        delay = child.policy.exited()
        log.error(
            "bitserve: the %s process exited unexpectedly (%s); restarting it in %g s",
            child.name,
            _exit_reason(code),
            delay,
        )
        if child.policy.crash_loop:
            log.error("bitserve: %s", self._describe_loop(child))
        child.restart_at = now + delay

    def _describe_loop(self, child: Child) -> str:
        policy = child.policy
        last = "" if child.last_exit is None else f", last {_exit_reason(child.last_exit)}"
        return (
            f"the {child.name} process is crash-looping: it exited {policy.recent_exits} times "
            f"within {policy.loop_window:g} s{last}; restarted every {policy.max_delay:g} s "
            "until it stays up (see the log for why it dies)"
        )

    def _running(self) -> list[subprocess.Popen[bytes]]:
        return [
            child.proc
            for child in self.children.values()
            if child.proc is not None and child.proc.poll() is None
        ]


def _exit_reason(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


# Loaded once in the parent: the forked child only calls prctl (no dlopen between fork and
# exec, where another thread's lock could be held).
_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _die_with_parent() -> None:
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
