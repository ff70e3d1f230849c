"""Who holds a job, and whether that holder is known to be dead.

A job's `worker_id` is `host:pid:incarnation.attempt`: the host and process that run the
attempt, a random token for that process's lifetime (its incarnation) and one for the attempt
(fences its writes). From it a reconciler on the same host can tell, without waiting for the
heartbeat to go stale, that the holder is gone:
- the pid no longer exists (the worker was SIGKILLed, e.g. by the OOM killer), or
- the pid is the reconciler's own but the incarnation is not (a container restarted: pid 1
  again, a new process).
A pid that exists and is not ours may be the holder or an unrelated process that reused the
pid: then nothing is known, and the heartbeat's staleness decides as before.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading

_incarnations: dict[int, str] = {}
_lock = threading.Lock()


def incarnation() -> str:
    """A random token for this process's lifetime (a forked child gets its own)."""
    pid = os.getpid()
    with _lock:
        if pid not in _incarnations:
            _incarnations[pid] = secrets.token_hex(4)
        return _incarnations[pid]


def new_worker_id() -> str:
    """Names one attempt of this process: `host:pid:incarnation.attempt`."""
    return f"{socket.gethostname()}:{os.getpid()}:{incarnation()}.{secrets.token_hex(3)}"


def holder_is_dead(worker_id: str | None) -> bool:
    """True only when the process named by `worker_id` is known to be gone (see above)."""
    if not worker_id:
        return False
    parts = worker_id.split(":")
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False  # another host (or an id of another form): its heartbeat decides
    pid, token = int(parts[1]), parts[2].split(".", 1)[0]
    if pid == os.getpid():
        return token != incarnation()
    return not _pid_exists(pid)


def _pid_exists(pid: int) -> bool:
    """A live process (a zombie, killed but not yet reaped by its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # "pid (comm) state ...": comm may hold spaces, so split after the last ")".
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc here: the signal said it exists
