"""The job state machine: every allowed transition walked through the real operation that
makes it, and every other one refused before anything is written. On SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from itertools import product

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import job_runs, jobs
from service.db import Database
from service.ids import new_id, utcnow
from service.job_states import (
    ACTIVE,
    FINISHED,
    HELD_BY_WORKER,
    TRANSITIONS,
    IllegalTransition,
    JobStatus,
    check_transition,
    is_allowed,
)
from service.models_store import TrainedModel
from service.settings import Settings
from service.tables import Job
from tests.model_fixtures import fixture_plan
from tests.unit.job_helpers import load

Q, R, C = JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING
S, F, X = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=utcnow().tzinfo)
WORKER = "w1"


def add_job(db: Database, status: JobStatus, **values: object) -> str:
    """A job row in `status`, held by WORKER if a worker holds jobs in that state."""
    job_id = new_id("job")
    held = status in HELD_BY_WORKER
    fields: dict[str, object] = {
        "id": job_id,
        "base_model": "tiny-R10x0.25",
        "status": status,
        "plan": fixture_plan(32),
        "overrides": {},
        "attempts": 1 if held else 0,
        "worker_id": WORKER if held else None,
        "heartbeat_at": T0 if held else None,
        "cancel_requested": status == C,
        "created_at": T0,
        "updated_at": T0,
    }
    fields.update(values)
    with db.sessionmaker() as session:
        session.add(Job(**fields))
        session.commit()
    return job_id


def stale(settings: Settings) -> datetime:
    return T0 + timedelta(seconds=settings.job_stale_after_seconds + 1)


def succeed(session: Session, job_id: str, settings: Settings) -> object:
    return job_runs.finish_succeeded(
        session,
        job_id,
        WORKER,
        TrainedModel(new_id("mdl"), "models/x", ["a", "b"], {"crop": 32}, {}, 0),
    )


# (from, to) -> (extra column values for the starting row, the operation).
Walk = Callable[[Session, str, Settings], object]
WALKS: dict[tuple[JobStatus, JobStatus], tuple[dict[str, object], Walk]] = {
    (Q, R): ({}, lambda s, j, st: job_runs.claim(s, j, "w2", st)),
    (Q, X): ({}, lambda s, j, st: jobs.request_cancel(s, None, j)),
    (Q, F): ({"attempts": 2}, lambda s, j, st: job_runs.claim(s, j, "w2", st)),
    (R, R): ({}, lambda s, j, st: job_runs.claim(s, j, "w2", st, now=stale(st))),
    (R, S): ({}, succeed),
    (R, F): ({}, lambda s, j, st: job_runs.finish_failed(s, j, WORKER, "boom", "it broke")),
    (R, C): ({}, lambda s, j, st: jobs.request_cancel(s, None, j)),
    (R, X): ({}, lambda s, j, st: job_runs.finish_cancelled(s, j, WORKER)),
    (R, Q): ({}, lambda s, j, st: job_runs.release(s, j, WORKER)),
    (C, X): ({}, lambda s, j, st: job_runs.finish_cancelled(s, j, WORKER)),
    (C, F): ({}, lambda s, j, st: job_runs.finish_failed(s, j, WORKER, "boom", "it broke")),
}
# The reconciler's repairs of a silent worker, each an allowed transition too.
RECONCILER_WALKS: dict[tuple[JobStatus, JobStatus], dict[str, object]] = {
    (R, Q): {},  # requeued for another attempt
    (R, F): {"attempts": 2},  # worker_lost: attempts exhausted
    (R, X): {"cancel_requested": True},  # cancel was requested: nobody will finish it
    (C, X): {},
}


def test_every_transition_in_the_table_has_a_walk() -> None:
    assert set(WALKS) == set(TRANSITIONS)
    assert set(RECONCILER_WALKS) <= set(TRANSITIONS)
    assert len(TRANSITIONS) == 11


@pytest.mark.parametrize("edge", list(WALKS), ids=lambda e: f"{e[0]}->{e[1]}")
def test_each_allowed_transition_through_its_operation(
    db: Database, settings: Settings, edge: tuple[JobStatus, JobStatus]
) -> None:
    source, target = edge
    values, walk = WALKS[edge]
    job_id = add_job(db, source, **values)
    with db.sessionmaker() as session:
        walk(session, job_id, settings)
    row = load(db, job_id)
    assert row.status is target
    assert (row.finished_at is not None) == target.finished


@pytest.mark.parametrize("edge", list(RECONCILER_WALKS), ids=lambda e: f"{e[0]}->{e[1]}")
def test_each_reconciler_repair_is_an_allowed_transition(
    db: Database, settings: Settings, edge: tuple[JobStatus, JobStatus]
) -> None:
    source, target = edge
    job_id = add_job(db, source, **RECONCILER_WALKS[edge])
    with db.sessionmaker() as session:
        job_runs.reconcile(session, settings, lambda _: None, now=stale(settings))
    assert load(db, job_id).status is target


@pytest.mark.parametrize(
    "edge",
    [(a, b) for a, b in product(JobStatus, JobStatus) if not is_allowed(a, b)],
    ids=lambda e: f"{e[0]}->{e[1]}",
)
def test_every_other_transition_is_refused_and_writes_nothing(
    db: Database, edge: tuple[JobStatus, JobStatus]
) -> None:
    source, target = edge
    job_id = add_job(db, source)
    before = load(db, job_id)
    with db.sessionmaker() as session, pytest.raises(IllegalTransition, match=source.value):
        job_runs.transition(session, job_id, (source,), target, {"updated_at": utcnow()})
    after = load(db, job_id)
    assert (after.status, after.updated_at) == (before.status, before.updated_at)


def test_the_table() -> None:
    # 36 pairs: 11 allowed; nothing leaves a finished state; nothing enters queued but from
    # running (release, requeue); succeeded only from running.
    assert sum(is_allowed(a, b) for a, b in product(JobStatus, JobStatus)) == 11
    assert not any(is_allowed(a, b) for a in FINISHED for b in JobStatus)
    assert {a for a, b in TRANSITIONS if b is Q} == {R}
    assert {a for a, b in TRANSITIONS if b is S} == {R}
    assert set(JobStatus) == ACTIVE | FINISHED and not ACTIVE & FINISHED
    check_transition((R, C), X)  # several sources: all must be allowed
    with pytest.raises(IllegalTransition, match=r"queued -> succeeded"):
        check_transition((R, Q), S)
    with pytest.raises(IllegalTransition):
        check_transition((), R)


def test_status_is_written_only_through_the_table(db: Database) -> None:
    job_id = add_job(db, R)
    with db.sessionmaker() as session, pytest.raises(ValueError, match="transition"):
        job_runs._update(session, [Job.id == job_id], {"status": S})
    # A string that is no JobStatus never reaches the database.
    with db.sessionmaker() as session, pytest.raises(sa.exc.StatementError) as caught:
        session.execute(sa.update(Job).where(Job.id == job_id).values(status="sleeping"))
    assert isinstance(caught.value.orig, ValueError)
    assert load(db, job_id).status is R
