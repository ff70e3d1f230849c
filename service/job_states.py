"""The fine-tuning job state machine: the states, and the one table of allowed transitions.

The REST side (service.jobs), the worker side and the reconciler (service.job_runs), the
worker (worker.runner) and the metrics all use these names; every write of a job's status goes
through service.job_runs.transition, which checks this table first. A transition that is not
in it is a bug, refused with IllegalTransition before anything is written.

    queued --claim--> running --succeed--> succeeded
      |  |              |  |----fail-----> failed  <--fail-- cancelling
      |  |<--release----|  |                                  |
      |  |   requeue       '--request_cancel--> cancelling --finish_cancel--> cancelled
      |  '--cancel (before any worker took it)--------------------------------> cancelled
      '--fail (claim refused: attempt limit reached) --> failed

docs/jobs.md tells the same story for users, with what happens on each failure.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING})
# A worker holds the job (it heartbeats, it may write progress and end the job).
HELD_BY_WORKER = frozenset({JobStatus.RUNNING, JobStatus.CANCELLING})

_Q, _R, _C = JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING
_S, _F, _X = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED

# (from, to) -> what does it. Finished states have no way out.
TRANSITIONS: dict[tuple[JobStatus, JobStatus], str] = {
    (_Q, _R): "claim: a worker takes the job (attempts + 1)",
    (_Q, _X): "request_cancel before any worker took the job",
    (_Q, _F): "claim refused: the attempt limit is reached",
    (_R, _R): "claim: another worker takes over a job whose heartbeat went stale",
    (_R, _S): "finish_succeeded: the model row is written in the same transaction",
    (_R, _F): "finish_failed; or the reconciler/claim: worker lost with attempts exhausted",
    (_R, _C): "request_cancel while a worker runs the job",
    (_R, _X): "finish_cancelled; or the reconciler: silent worker, cancel requested",
    (_R, _Q): "release (orderly worker shutdown) or the reconciler's requeue (silent worker)",
    (_C, _X): "finish_cancelled; or the reconciler: silent worker",
    (_C, _F): "finish_failed: the job failed before it noticed the cancel",
}


class IllegalTransition(RuntimeError):
    """A status change the table does not allow: a bug in the caller, never a user error."""


def is_allowed(source: JobStatus, target: JobStatus) -> bool:
    return (source, target) in TRANSITIONS


def check_transition(
    sources: frozenset[JobStatus] | tuple[JobStatus, ...], target: JobStatus
) -> None:
    """Raise IllegalTransition unless every state in `sources` may move to `target`."""
    refused = sorted(s.value for s in sources if not is_allowed(JobStatus(s), target))
    if refused or not sources:
        raise IllegalTransition(
            f"job status {', '.join(refused) or '(none)'} -> {target.value} is not an allowed "
            "transition (service.job_states.TRANSITIONS)"
        )
