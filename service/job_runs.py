"""What a worker does to a job row, and the reconciler that repairs lost work.

Every write here is a compare-and-set on (status, worker_id): a worker takes a job with
`claim`, and from then on a worker that lost the job (its heartbeat went stale and another
took over) cannot overwrite it. The state diagram and the REST side are in service.jobs.
No FastAPI here: the worker imports this module. Every status change goes through
`transition`, which checks service.job_states.TRANSITIONS before it writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.evaluations import record_validation
from service.ids import utcnow
from service.job_states import HELD_BY_WORKER, JobStatus, check_transition
from service.models_store import TrainedModel, model_row
from service.settings import Settings
from service.tables import Job, JobHistory, Model

log = logging.getLogger(__name__)

# A job committed but not yet sent is the request handler's to send; the reconciler leaves
# it alone this long before assuming the send was lost (e.g. the gateway died in between).
SEND_GRACE_SECONDS = 10.0

Send = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Worker side: every write is a compare-and-set on (status, worker_id)


@dataclass(frozen=True)
class Claim:
    claimed: bool
    reason: str  # "claimed", "too_many_attempts", "not_found", or the status that refused it
    job: Job | None = None


def claim(
    session: Session,
    job_id: str,
    worker_id: str,
    settings: Settings,
    now: datetime | None = None,
) -> Claim:
    """Take the job: queued (or running with a stale heartbeat) -> running, attempts + 1."""
    now = now or utcnow()
    stale = now - timedelta(seconds=settings.job_stale_after_seconds)
    takeable = sa.or_(
        Job.status == JobStatus.QUEUED,
        sa.and_(Job.status == JobStatus.RUNNING, _stale(stale)),
    )
    claimed = transition(
        session,
        job_id,
        (JobStatus.QUEUED, JobStatus.RUNNING),
        JobStatus.RUNNING,
        {
            "attempts": Job.attempts + 1,
            "worker_id": worker_id,
            "heartbeat_at": now,
            "started_at": sa.func.coalesce(Job.started_at, now),
            "updated_at": now,
        },
        takeable,
        Job.attempts < settings.job_max_attempts,
    )
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return Claim(False, "not_found")
    if claimed:
        return Claim(True, "claimed", job)
    takeable_now = job.status == JobStatus.QUEUED or (
        job.status == JobStatus.RUNNING and (job.heartbeat_at is None or job.heartbeat_at < stale)
    )
    if takeable_now and job.attempts >= settings.job_max_attempts:
        message = (
            f"job was started {job.attempts} times (limit {settings.job_max_attempts}) "
            "without finishing; its last worker probably crashed"
        )
        values = _failed_values("too_many_attempts", message, now)
        transition(session, job_id, (job.status,), JobStatus.FAILED, values)
        session.refresh(job)
        return Claim(False, "too_many_attempts", job)
    return Claim(False, job.status, job)


def heartbeat(session: Session, job_id: str, worker_id: str, now: datetime | None = None) -> str:
    """Refresh the heartbeat: "ok", "cancel" (cancel requested) or "lost" (not ours any more)."""
    now = now or utcnow()
    if not _update(session, [_owned(job_id, worker_id)], {"heartbeat_at": now}):
        return "lost"
    requested = session.scalar(sa.select(Job.cancel_requested).where(Job.id == job_id))
    return "cancel" if requested else "ok"


def record_progress(
    session: Session,
    job_id: str,
    worker_id: str,
    progress: Mapping[str, Any],
    now: datetime | None = None,
    *,
    history: Mapping[str, Any] | None = None,
) -> bool:
    """Store the latest progress, and the curves when given, in one transaction (callers
    throttle); False when the job is no longer ours (then neither is written)."""
    now = now or utcnow()
    values = {"progress": dict(progress), "heartbeat_at": now, "updated_at": now}
    ours = _execute(session, [_owned(job_id, worker_id)], values, commit=False)
    if ours and history is not None:
        _store_history(session, job_id, history, now)
    session.commit()
    return ours


def load_history(session: Session, job_id: str) -> dict[str, Any] | None:
    """The curves stored for a job (a new attempt continues them), or None."""
    row = session.get(JobHistory, job_id)
    return dict(row.history) if row is not None else None


def _store_history(
    session: Session, job_id: str, history: Mapping[str, Any], now: datetime
) -> None:
    """Upsert inside the caller's transaction: only the job's owner writes (it was just
    checked with the job row's compare-and-set), so an update-else-insert cannot race."""
    updated = session.execute(
        sa.update(JobHistory)
        .where(JobHistory.job_id == job_id)
        .values(history=dict(history), updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if _rowcount(updated) == 0:
        session.add(JobHistory(job_id=job_id, history=dict(history), updated_at=now))
        session.flush()


def finish_succeeded(
    session: Session,
    job_id: str,
    worker_id: str,
    trained: TrainedModel,
    *,
    progress: Mapping[str, Any] | None = None,
    history: Mapping[str, Any] | None = None,
    deploy: Callable[[Session], Mapping[str, Any]] | None = None,
    now: datetime | None = None,
) -> Model | None:
    """Model row + job succeeded (+ its final curves, + its deploy_to carried out by `deploy`,
    whose outcome is recorded on the job) in ONE transaction; None if cancel was requested
    meanwhile (or the job is no longer ours): then the caller discards the artifact."""
    now = now or utcnow()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return None
    values: dict[str, Any] = {
        "model_id": trained.model_id,
        "metrics": trained.metrics,
        "finished_at": now,
        "updated_at": now,
        "error_code": None,
        "error_message": None,
    }
    if progress is not None:
        values["progress"] = dict(progress)
    succeeded = transition(
        session,
        job_id,
        (JobStatus.RUNNING,),
        JobStatus.SUCCEEDED,
        values,
        Job.worker_id == worker_id,
        Job.cancel_requested.is_(False),
        commit=False,
    )
    if not succeeded:
        session.rollback()
        return None
    model = model_row(job, trained, created_at=now)
    session.add(model)
    session.flush()  # the model's row first: its validation evaluation refers to it
    record_validation(session, model, trained.metrics)
    if history is not None:
        _store_history(session, job_id, history, now)
    if deploy is not None:
        outcome = dict(deploy(session))
        session.execute(sa.update(Job).where(Job.id == job_id).values(deployment=outcome))
    session.commit()
    return model


def finish_failed(
    session: Session,
    job_id: str,
    worker_id: str | None,
    code: str,
    message: str,
    now: datetime | None = None,
) -> bool:
    """running/cancelling -> failed with an error; `worker_id` None skips the fence."""
    now = now or utcnow()
    fence = [Job.worker_id == worker_id] if worker_id is not None else []
    values = _failed_values(code, message, now)
    return transition(session, job_id, HELD_BY_WORKER, JobStatus.FAILED, values, *fence)


def finish_cancelled(
    session: Session, job_id: str, worker_id: str | None, now: datetime | None = None
) -> bool:
    """running/cancelling -> cancelled (no model is kept)."""
    now = now or utcnow()
    fence = [Job.worker_id == worker_id] if worker_id is not None else []
    values = {"cancel_requested": True, "finished_at": now, "updated_at": now}
    return transition(session, job_id, HELD_BY_WORKER, JobStatus.CANCELLED, values, *fence)


def release(session: Session, job_id: str, worker_id: str, now: datetime | None = None) -> bool:
    """running -> queued after an orderly worker shutdown (training checkpointed first).

    The attempt is handed back: a deploy or scale-down is not a crash, and must not push a
    job towards `job_max_attempts`. The caller sends the job again (or the reconciler does).
    A job whose cancel was requested is not released (it is the caller's to cancel).
    """
    now = now or utcnow()
    values = {
        "attempts": sa.case((Job.attempts > 0, Job.attempts - 1), else_=0),
        **_unassigned(now),
    }
    return transition(
        session,
        job_id,
        (JobStatus.RUNNING,),
        JobStatus.QUEUED,
        values,
        Job.worker_id == worker_id,
        Job.cancel_requested.is_(False),
    )


# ---------------------------------------------------------------------------------------------
# Reconciler


@dataclass
class Reconciled:
    resent: list[str] = field(default_factory=list)  # queued jobs sent again
    requeued: list[str] = field(default_factory=list)  # running, worker silent or dead -> queued
    failed: list[str] = field(default_factory=list)  # worker silent, attempts exhausted
    cancelled: list[str] = field(default_factory=list)  # worker silent while cancelling
    forgotten: int = 0  # queued jobs whose message the broker lost (sent again from now on)
    send_failed: bool = False  # the broker refused a send: it is down, try again soon
    # Something is due this many seconds from now (a dead worker's job whose last heartbeat is
    # too recent yet, an unsent job in its grace): the next pass should run then, not a whole
    # interval later.
    next_due_in: float | None = None

    def __bool__(self) -> bool:
        return bool(self.resent or self.requeued or self.failed or self.cancelled)

    def due_in(self, seconds: float) -> None:
        self.next_due_in = seconds if self.next_due_in is None else min(self.next_due_in, seconds)


def dead_holder_grace(settings: Settings) -> float:
    """How old a dead holder's last heartbeat must be before its job is taken away.

    The holder is known dead (the caller's `holder_is_dead`), so this only guards against
    a wrong verdict, e.g. two hosts of the same name: three missed beats of a live worker
    (it beats every min(job_heartbeat_seconds, 1 s)), never longer than the stale limit."""
    beat = min(settings.job_heartbeat_seconds, 1.0)
    return min(max(3 * beat, 3.0), settings.job_stale_after_seconds)


def reconcile(
    session: Session,
    settings: Settings,
    send: Send,
    now: datetime | None = None,
    *,
    holder_is_dead: Callable[[str], bool] | None = None,
    messages_lost: bool = False,
) -> Reconciled:
    """Repair what the broker or a dead worker lost. Safe to run from several processes:
    every change is a compare-and-set, and a duplicate message is refused by `claim`.

    `holder_is_dead(worker_id)` True: that worker's process is known to be gone, so its job is
    re-queued at once instead of after `job_stale_after_seconds` without a heartbeat (a short
    grace still applies, `dead_holder_grace`). `messages_lost`: the broker lost its messages
    (restarted empty): every queued job counts as never sent and is sent again now."""
    now = now or utcnow()
    report = Reconciled()
    stale = now - timedelta(seconds=settings.job_stale_after_seconds)
    grace_s = dead_holder_grace(settings)
    held = session.execute(
        sa.select(
            Job.id, Job.status, Job.attempts, Job.cancel_requested, Job.worker_id, Job.heartbeat_at
        ).where(Job.status.in_(HELD_BY_WORKER))
    ).all()
    for job_id, status, attempts, cancel_requested, worker_id, heartbeat_at in held:
        if heartbeat_at is None or heartbeat_at < stale:
            fence, why = (
                _stale(stale),
                (
                    f"the worker stopped answering (no heartbeat for "
                    f"{settings.job_stale_after_seconds:g} s)"
                ),
            )
        elif worker_id and holder_is_dead is not None and holder_is_dead(worker_id):
            due_in = (heartbeat_at - (now - timedelta(seconds=grace_s))).total_seconds()
            if due_in > 0:
                report.due_in(due_in)
                continue
            # Its heartbeat has not moved since (a live worker, wrongly judged, refuses it).
            fence = sa.and_(Job.worker_id == worker_id, _stale(now - timedelta(seconds=grace_s)))
            why = f"the worker process died ({worker_id})"
        else:
            continue
        _repair_held(
            session, settings, report, job_id, status, attempts, cancel_requested, fence, why, now
        )

    forgotten: list[str] = []
    if messages_lost:
        # Forget that they were sent (durably: if a send below fails, the "never sent" rule
        # picks them up on later passes) and send them now, without the grace for a request
        # that is sending (their requests sent them long ago). updated_at is kept as it was.
        forgotten = list(
            session.scalars(
                sa.select(Job.id).where(
                    Job.status == JobStatus.QUEUED, Job.enqueued_at.is_not(None)
                )
            ).all()
        )
        if forgotten:
            session.execute(
                sa.update(Job)
                .where(Job.id.in_(forgotten), Job.status == JobStatus.QUEUED)
                .values(enqueued_at=None, updated_at=Job.updated_at)
                .execution_options(synchronize_session=False)
            )
            session.commit()
        report.forgotten = len(forgotten)

    # Queued jobs whose message may be lost: never sent (after a grace period for the request
    # that is sending it right now), or sent long ago (e.g. Redis restarted without persistence).
    grace = now - timedelta(seconds=SEND_GRACE_SECONDS)
    resend_before = now - timedelta(seconds=settings.job_resend_after_seconds)
    unsent = sa.or_(
        sa.and_(Job.enqueued_at.is_(None), Job.updated_at < grace),
        Job.enqueued_at < resend_before,
    )
    due = [*report.requeued, *forgotten]
    due += session.scalars(
        sa.select(Job.id).where(Job.status == JobStatus.QUEUED, unsent).order_by(Job.created_at)
    ).all()
    for job_id in dict.fromkeys(due):
        # Take the turn with a compare-and-set, so two reconcilers do not both send.
        condition = [Job.id == job_id, Job.status == JobStatus.QUEUED]
        if job_id in report.requeued or job_id in forgotten:
            condition.append(Job.enqueued_at.is_(None))
        else:
            condition.append(unsent)
        # updated_at stays: a send is no change of the job, and a failed send must not give
        # the job a new grace period (the rule above is for a request that is sending it).
        if not _update(session, condition, {"enqueued_at": now, "updated_at": Job.updated_at}):
            continue
        try:
            send(job_id)
        except Exception as exc:
            log.warning("reconciler could not send job %s: %s", job_id, exc)
            queued = [Job.id == job_id, Job.status == JobStatus.QUEUED]
            _update(session, queued, {"enqueued_at": None, "updated_at": Job.updated_at})
            # The broker is down: every other send would wait for its timeout too. The jobs
            # stay unsent and the next pass (soon: see send_failed) sends them.
            report.send_failed = True
            break
        if job_id not in report.requeued:
            report.resent.append(job_id)
    # An unsent job still in its grace (e.g. recorded while the broker was down) is due soon:
    # say when, so it is sent then and not a whole interval later.
    youngest = session.scalar(
        sa.select(sa.func.min(Job.updated_at)).where(
            Job.status == JobStatus.QUEUED, Job.enqueued_at.is_(None), Job.updated_at >= grace
        )
    )
    if youngest is not None:
        report.due_in(max(0.0, (youngest - grace).total_seconds()))
    return report


def _repair_held(
    session: Session,
    settings: Settings,
    report: Reconciled,
    job_id: str,
    status: str,
    attempts: int,
    cancel_requested: bool,
    fence: sa.ColumnElement[bool],
    why: str,
    now: datetime,
) -> None:
    """A job whose worker is gone: cancelled (cancel was asked), failed (attempts used up) or
    back in the queue; `fence` makes each a compare-and-set against a worker coming back."""
    was = (status,)
    if status == JobStatus.CANCELLING or cancel_requested:
        values = {"finished_at": now, "updated_at": now}
        if transition(session, job_id, was, JobStatus.CANCELLED, values, fence):
            report.cancelled.append(job_id)
    elif attempts >= settings.job_max_attempts:
        message = f"{why} on attempt {attempts} of {settings.job_max_attempts}"
        values = _failed_values("worker_lost", message, now)
        if transition(session, job_id, was, JobStatus.FAILED, values, fence):
            report.failed.append(job_id)
    elif transition(session, job_id, was, JobStatus.QUEUED, _unassigned(now), fence):
        report.requeued.append(job_id)


# ---------------------------------------------------------------------------------------------
# helpers


def _stale(before: datetime) -> sa.ColumnElement[bool]:
    return sa.or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < before)


def _owned(job_id: str, worker_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(Job.id == job_id, Job.worker_id == worker_id, Job.status.in_(HELD_BY_WORKER))


def _failed_values(code: str, message: str, now: datetime) -> dict[str, Any]:
    return {
        "error_code": code,
        "error_message": message[:4000],
        "finished_at": now,
        "updated_at": now,
    }


def _unassigned(now: datetime) -> dict[str, Any]:
    """Back in the queue: no worker, no heartbeat, not sent yet (the caller or reconciler sends)."""
    return {"worker_id": None, "heartbeat_at": None, "enqueued_at": None, "updated_at": now}


def transition(
    session: Session,
    job_id: str,
    sources: Iterable[JobStatus | str],
    target: JobStatus,
    values: Mapping[str, Any],
    *conditions: sa.ColumnElement[bool],
    commit: bool = True,
) -> bool:
    """Move job `job_id` from one of `sources` to `target` with one compare-and-set UPDATE.

    Raises IllegalTransition (nothing written) unless service.job_states allows every
    source -> target. Returns True when the row changed (False: another writer got there
    first, or a condition did not hold). `commit=False` leaves the transaction open for the
    caller (finish_succeeded adds the model row to it).
    """
    states = tuple(JobStatus(s) for s in sources)
    check_transition(states, target)
    where = [Job.id == job_id, Job.status.in_(states), *conditions]
    return _execute(session, where, {**values, "status": target}, commit=commit)


def _update(session: Session, where: Sequence[Any], values: dict[str, Any]) -> bool:
    """A conditional UPDATE of anything but the status (that is `transition`'s), committed."""
    if "status" in values:
        raise ValueError("status changes go through transition(), which checks the table")
    return _execute(session, where, values)


def _execute(
    session: Session, where: Sequence[Any], values: Mapping[str, Any], *, commit: bool = True
) -> bool:
    result = session.execute(
        sa.update(Job).where(*where).values(**values).execution_options(synchronize_session=False)
    )
    if commit:
        session.commit()
    return _rowcount(result) == 1


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)
