"""The REST side of the job state machine (service.jobs): planning, creation, idempotency,
listing. On real databases: SQLite and PostgreSQL, migrated (tests/unit/conftest.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from bitcore import hyperrule
from bitcore.data.index import Sample
from bitcore.data.split import stratified_split
from service import job_runs, jobs
from service.db import Database
from service.domain_errors import DomainError
from service.http_errors import status_of
from service.ids import utcnow
from service.schemas import JobPublic
from service.settings import Settings
from service.tables import Dataset, Job
from tests.unit.job_helpers import NO_QUOTA, add_dataset, create, load


def test_training_examples_match_the_stratified_split() -> None:
    counts = [7, 5, 2, 1, 30]
    samples = [Sample(f"{c}/{i}.png", c) for c, n in enumerate(counts) for i in range(n)]
    for fraction in (0.0, 0.1, 0.25, 0.5, 0.9):
        train, _ = stratified_split(samples, fraction, seed=3)
        assert jobs.training_examples(counts, fraction) == len(train)


def test_create_plans_with_the_hyperrule_and_sends_after_commit(db: Database) -> None:
    dataset_id = add_dataset(db)
    sent: list[str] = []
    job, created = create(db, dataset_id, sent, overrides={"steps": 20, "batch_size": 8})
    assert created and sent == [job.id]
    # 7/5/2 images, 10% validation: 1 per class held out -> 11 training images.
    expected = hyperrule.plan(11, (40, 48), steps=20, batch_size=8).to_dict()
    expected["source"]["from_scratch"] = True
    row = load(db, job.id)
    assert row.plan == expected
    assert row.plan["total_steps"] == 20 and row.plan["crop"] == 128
    assert row.status == "queued" and row.attempts == 0 and row.enqueued_at is not None
    public = JobPublic.from_row(row).model_dump(mode="json")
    assert public["progress"] == {
        "step": 0,
        "total_steps": 20,
        "loss": None,
        "lr": None,
        "images_per_second": None,
        "eta_seconds": None,
        "phase": None,
        "downloaded_bytes": None,
        "total_bytes": None,
    }
    assert public["created_at"].endswith("Z") and public["started_at"] is None


def test_a_failed_send_leaves_the_job_queued_for_the_reconciler(
    db: Database, settings: Settings
) -> None:
    dataset_id = add_dataset(db)

    def broker_down(job_id: str) -> None:
        raise ConnectionError("broker unreachable")

    with db.sessionmaker() as session:
        job, created = jobs.create_job(
            session,
            jobs.JobRequest(dataset_id, "tiny-R10x0.25"),
            send=broker_down,
            settings=settings,
        )
    assert created and load(db, job.id).enqueued_at is None
    sent: list[str] = []
    with db.sessionmaker() as session:  # within the grace period the request handler owns it
        assert not job_runs.reconcile(session, settings, sent.append)
        later = utcnow() + timedelta(seconds=job_runs.SEND_GRACE_SECONDS + 1)
        report = job_runs.reconcile(session, settings, sent.append, now=later)
    assert report.resent == [job.id] and sent == [job.id]
    assert load(db, job.id).enqueued_at == later


@pytest.mark.parametrize(
    ("fields", "status", "code", "field"),
    [
        ({"base_model": "BiT-Z-R1"}, 422, "unknown_base_model", "base_model"),
        ({"overrides": {"steps": 0}}, 422, "invalid_override", "overrides.steps"),
        ({"overrides": {"crop": 200}}, 422, "invalid_override", "overrides.crop"),
        ({"overrides": {"epochs": 3}}, 422, "invalid_override", "overrides.epochs"),
        ({"validation_fraction": 1.0}, 422, "invalid_request", "validation_fraction"),
    ],
)
def test_create_refuses_bad_requests(
    db: Database, fields: dict[str, object], status: int, code: str, field: str
) -> None:
    dataset_id = add_dataset(db)
    body = {"dataset_id": dataset_id, "base_model": "tiny-R10x0.25", **fields}
    with db.sessionmaker() as session, pytest.raises(DomainError) as err:
        jobs.create_job(session, jobs.JobRequest(**body), send=lambda _: None, settings=NO_QUOTA)  # type: ignore[arg-type]
    assert (status_of(err.value), err.value.code, err.value.details["field"]) == (
        status,
        code,
        field,
    )
    with db.sessionmaker() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 0


def test_create_answers_404_for_missing_or_foreign_datasets(db: Database) -> None:
    foreign = add_dataset(db, tenant="other")
    for dataset_id in (foreign, "ds_" + "a" * 20):
        with pytest.raises(DomainError) as err:
            create(db, dataset_id)
        assert (status_of(err.value), err.value.code) == (404, "not_found")
    deleting = add_dataset(db, status="deleting")
    with pytest.raises(DomainError) as err:
        create(db, deleting)
    assert (status_of(err.value), err.value.code) == (409, "dataset_not_ready")


def test_a_dataset_deleted_between_read_and_insert_is_404_not_500(db: Database) -> None:
    dataset_id = add_dataset(db)
    sent: list[str] = []
    deleted: list[bool] = []

    def delete_the_dataset(_session: object) -> None:
        # Another request deletes the dataset after create_job read it, before its commit.
        if not deleted:
            deleted.append(True)
            with db.engine.begin() as conn:
                conn.execute(sa.delete(Dataset).where(Dataset.id == dataset_id))

    request = jobs.JobRequest(dataset_id=dataset_id, base_model="tiny-R10x0.25")
    with db.sessionmaker() as session:
        sa.event.listen(session, "before_commit", delete_the_dataset)
        with pytest.raises(DomainError) as err:
            jobs.create_job(session, request, send=sent.append, settings=NO_QUOTA)
    assert (status_of(err.value), err.value.code) == (404, "not_found")
    assert deleted == [True]
    with db.sessionmaker() as session:
        assert session.scalars(sa.select(Job.id)).all() == []
    assert sent == []


def test_idempotency_key_replays_or_conflicts(db: Database) -> None:
    dataset_id = add_dataset(db)
    sent: list[str] = []
    first, created = create(db, dataset_id, sent, key="k1", seed=4)
    again, created_again = create(db, dataset_id, sent, key="k1", seed=4)
    assert created and not created_again
    assert again.id == first.id and sent == [first.id]  # sent once
    with pytest.raises(DomainError) as err:
        create(db, dataset_id, sent, key="k1", seed=5)
    assert (status_of(err.value), err.value.code) == (409, "idempotency_conflict")
    other, created_other = create(db, dataset_id, sent, key="k2", seed=4)
    assert created_other and other.id != first.id


def test_list_query_filters_by_tenant_and_status(db: Database) -> None:
    dataset_id = add_dataset(db)
    a, _ = create(db, dataset_id)
    b, _ = create(db, dataset_id)
    with db.sessionmaker() as session:
        jobs.request_cancel(session, None, b.id)
        assert [j.id for j in session.scalars(jobs.list_jobs(None, "queued"))] == [a.id]
        assert {j.id for j in session.scalars(jobs.list_jobs(None))} == {a.id, b.id}
        assert list(session.scalars(jobs.list_jobs("someone-else"))) == []
    with pytest.raises(ValueError, match="'sleeping' is not a valid JobStatus"):
        jobs.list_jobs(None, "sleeping")  # type: ignore[arg-type]
