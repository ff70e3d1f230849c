"""The job state machine (service.jobs) on real databases: SQLite and PostgreSQL, migrated."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from bitcore import hyperrule
from bitcore.data.index import Sample
from bitcore.data.split import stratified_split
from service import jobs
from service.db import Database, migrate
from service.ids import new_id, utcnow
from service.settings import Settings
from service.storage import Storage
from service.tables import Dataset, Job, Model
from tests.services import create_database, drop_database
from worker.runner import JobRun, Throttled, checkpoint_every

CLASSES = [{"name": "cat", "count": 7}, {"name": "dog", "count": 5}, {"name": "eel", "count": 2}]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('jobs-db') / 'bitserve.db'}"
        dropper = None
    else:
        admin = request.getfixturevalue("postgres_admin_url")
        url, name = create_database(admin)
        dropper = (admin, name)
    migrate(url)
    db = Database(url)
    yield db
    db.dispose()
    if dropper:
        drop_database(*dropper)


@pytest.fixture
def db(database: Database) -> Database:
    with database.sessionmaker() as session:  # each test starts from empty tables
        for table in (Model, Job, Dataset):
            session.execute(sa.delete(table))
        session.commit()
    return database


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path,
        job_max_attempts=2,
        job_stale_after_seconds=60,
        job_resend_after_seconds=600,
    )


def add_dataset(db: Database, tenant: str | None = None, status: str = "ready") -> str:
    dataset_id = new_id("ds")
    with db.sessionmaker() as session:
        session.add(
            Dataset(
                id=dataset_id,
                tenant_id=tenant,
                name="pets",
                status=status,
                num_images=14,
                num_classes=3,
                classes=CLASSES,
                image_size={"median_height": 40, "median_width": 48},
                rejected=[],
                bytes=1234,
                storage_key=f"datasets/{dataset_id}",
            )
        )
        session.commit()
    return dataset_id


def create(
    db: Database,
    dataset_id: str,
    sent: list[str] | None = None,
    key: str | None = None,
    tenant: str | None = None,
    **fields: object,
) -> tuple[Job, bool]:
    request = jobs.JobRequest(dataset_id=dataset_id, base_model="tiny-R10x0.25", **fields)  # type: ignore[arg-type]
    outbox = sent if sent is not None else []
    with db.sessionmaker() as session:
        return jobs.create_job(
            session, request, send=outbox.append, tenant_id=tenant, idempotency_key=key
        )


def load(db: Database, job_id: str) -> Job:
    with db.sessionmaker() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


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
    public = jobs.to_public(row)
    assert public["progress"] == {
        "step": 0,
        "total_steps": 20,
        "loss": None,
        "lr": None,
        "images_per_second": None,
        "eta_seconds": None,
        "phase": None,
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
            session, jobs.JobRequest(dataset_id, "tiny-R10x0.25"), send=broker_down
        )
    assert created and load(db, job.id).enqueued_at is None
    sent: list[str] = []
    with db.sessionmaker() as session:  # within the grace period the request handler owns it
        assert not jobs.reconcile(session, settings, sent.append)
        later = utcnow() + timedelta(seconds=jobs.SEND_GRACE_SECONDS + 1)
        report = jobs.reconcile(session, settings, sent.append, now=later)
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
    with db.sessionmaker() as session, pytest.raises(jobs.JobError) as err:
        jobs.create_job(session, jobs.JobRequest(**body), send=lambda _: None)  # type: ignore[arg-type]
    assert (err.value.status, err.value.code, err.value.details["field"]) == (status, code, field)
    with db.sessionmaker() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 0


def test_create_answers_404_for_missing_or_foreign_datasets(db: Database) -> None:
    foreign = add_dataset(db, tenant="other")
    for dataset_id in (foreign, "ds_" + "a" * 20):
        with pytest.raises(jobs.JobError) as err:
            create(db, dataset_id)
        assert (err.value.status, err.value.code) == (404, "not_found")
    deleting = add_dataset(db, status="deleting")
    with pytest.raises(jobs.JobError) as err:
        create(db, deleting)
    assert (err.value.status, err.value.code) == (409, "dataset_not_ready")


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
        with pytest.raises(jobs.JobError) as err:
            jobs.create_job(session, request, send=sent.append)
    assert (err.value.status, err.value.code) == (404, "not_found")
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
    with pytest.raises(jobs.JobError) as err:
        create(db, dataset_id, sent, key="k1", seed=5)
    assert (err.value.status, err.value.code) == (409, "idempotency_conflict")
    other, created_other = create(db, dataset_id, sent, key="k2", seed=4)
    assert created_other and other.id != first.id


def test_claim_is_a_compare_and_set(db: Database, settings: Settings) -> None:
    job, _ = create(db, add_dataset(db))
    with db.sessionmaker() as session:
        first = jobs.claim(session, job.id, "w1", settings)
        second = jobs.claim(session, job.id, "w2", settings)
        missing = jobs.claim(session, "job_" + "b" * 20, "w3", settings)
    assert first.claimed and first.job is not None and first.job.attempts == 1
    assert (second.claimed, second.reason) == (False, "running")
    assert (missing.claimed, missing.reason) == (False, "not_found")
    row = load(db, job.id)
    assert (row.status, row.worker_id, row.attempts) == ("running", "w1", 1)
    assert row.started_at is not None and row.heartbeat_at == row.started_at


def test_a_stale_job_is_reclaimed_and_the_old_worker_is_fenced_off(
    db: Database, settings: Settings
) -> None:
    job, _ = create(db, add_dataset(db))
    t0 = utcnow()
    stale = t0 + timedelta(seconds=settings.job_stale_after_seconds + 1)
    with db.sessionmaker() as session:
        assert jobs.claim(session, job.id, "w1", settings, now=t0).claimed
        assert not jobs.claim(
            session, job.id, "w2", settings, now=t0 + timedelta(seconds=30)
        ).claimed
        taken = jobs.claim(session, job.id, "w2", settings, now=stale)
        assert taken.claimed and taken.job is not None and taken.job.attempts == 2
        assert taken.job.started_at == t0  # the first start is kept
        assert jobs.heartbeat(session, job.id, "w1") == "lost"
        assert not jobs.record_progress(session, job.id, "w1", {"step": 3})
        assert (
            jobs.finish_succeeded(
                session,
                job.id,
                "w1",
                model_id=new_id("mdl"),
                storage_key="models/x",
                classes=["a"],
                input_spec={},
                metrics={},
            )
            is None
        )
        assert jobs.heartbeat(session, job.id, "w2") == "ok"
    assert load(db, job.id).worker_id == "w2"


def test_a_fenced_off_worker_leaves_the_new_owners_work_dir_alone(
    db: Database, settings: Settings
) -> None:
    # w1 stalled past the stale limit and w2 took the job over; w1 then fails (its dataset
    # index is not on disk) before its heartbeat noticed. w2's checkpoints must survive.
    job, _ = create(db, add_dataset(db))
    t0 = utcnow()
    with db.sessionmaker() as session:
        old = jobs.claim(session, job.id, "w1", settings, now=t0)
        stale = t0 + timedelta(seconds=settings.job_stale_after_seconds + 1)
        assert jobs.claim(session, job.id, "w2", settings, now=stale).claimed
    assert old.job is not None
    storage = Storage(settings.artifact_root)
    checkpoint = storage.job_dir(job.id) / "checkpoint.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"w2's progress")
    run = JobRun(db, storage, settings, old.job, "w1", threading.Event())
    assert run.execute() == "lost"
    assert checkpoint.read_bytes() == b"w2's progress"
    after = load(db, job.id)
    assert (after.status, after.worker_id, after.error_code) == ("running", "w2", None)


def test_claim_past_the_attempt_limit_fails_the_job(db: Database, settings: Settings) -> None:
    job, _ = create(db, add_dataset(db))
    now = utcnow()
    step = timedelta(seconds=settings.job_stale_after_seconds + 1)
    with db.sessionmaker() as session:
        assert jobs.claim(session, job.id, "w1", settings, now=now).claimed
        assert jobs.claim(session, job.id, "w2", settings, now=now + step).claimed
        refused = jobs.claim(session, job.id, "w3", settings, now=now + 2 * step)
    assert (refused.claimed, refused.reason) == (False, "too_many_attempts")
    row = load(db, job.id)
    assert (row.status, row.error_code, row.attempts) == ("failed", "too_many_attempts", 2)
    assert jobs.to_public(row)["error"]["code"] == "too_many_attempts"


def test_cancel_transitions(db: Database, settings: Settings) -> None:
    dataset_id = add_dataset(db)
    queued, _ = create(db, dataset_id)
    running, _ = create(db, dataset_id)
    with db.sessionmaker() as session:
        done = jobs.request_cancel(session, queued.id)
        assert done.status == "cancelled" and done.finished_at is not None
        # Its message may still be in the broker: the claim refuses it.
        assert jobs.claim(session, queued.id, "w1", settings).reason == "cancelled"
        with pytest.raises(jobs.JobError) as err:
            jobs.request_cancel(session, queued.id)
        assert (err.value.status, err.value.code) == (409, "job_finished")

        assert jobs.claim(session, running.id, "w1", settings).claimed
        assert jobs.heartbeat(session, running.id, "w1") == "ok"
        assert jobs.request_cancel(session, running.id).status == "cancelling"
        assert jobs.request_cancel(session, running.id).status == "cancelling"  # idempotent
        assert jobs.heartbeat(session, running.id, "w1") == "cancel"
        assert (
            jobs.finish_succeeded(  # too late: the cancel wins, no model is kept
                session,
                running.id,
                "w1",
                model_id=new_id("mdl"),
                storage_key="models/x",
                classes=["a"],
                input_spec={},
                metrics={},
            )
            is None
        )
        assert jobs.finish_cancelled(session, running.id, "w1")
        assert session.scalar(sa.select(sa.func.count()).select_from(Model)) == 0
        with pytest.raises(jobs.JobError) as err:
            jobs.request_cancel(session, "job_" + "c" * 20)
        assert err.value.status == 404
    assert load(db, running.id).status == "cancelled"


def test_success_writes_the_model_and_the_job_together(db: Database, settings: Settings) -> None:
    job, _ = create(db, add_dataset(db), name="pets v1")
    model_id = new_id("mdl")
    metrics = {"accuracy": 0.75}
    with db.sessionmaker() as session:
        assert jobs.claim(session, job.id, "w1", settings).claimed
        progress = {"step": 5, "total_steps": 500, "loss": 1.5, "phase": "training"}
        assert jobs.record_progress(session, job.id, "w1", progress)
        assert load(db, job.id).progress == progress
        model = jobs.finish_succeeded(
            session,
            job.id,
            "w1",
            model_id=model_id,
            storage_key=f"models/{model_id}",
            classes=["cat", "dog", "eel"],
            input_spec={"crop": 128, "mean": [0.5] * 3, "std": [0.5] * 3},
            metrics=metrics,
        )
        assert model is not None
        # A late duplicate delivery finds the job finished.
        assert jobs.claim(session, job.id, "w2", settings).reason == "succeeded"
        assert not jobs.finish_failed(session, job.id, "w1", "x", "y")
    row = load(db, job.id)
    assert (row.status, row.model_id, row.metrics) == ("succeeded", model_id, metrics)
    with db.sessionmaker() as session:
        stored = session.get(Model, model_id)
        assert stored is not None
        assert (stored.job_id, stored.name, stored.classes) == (
            job.id,
            "pets v1",
            ["cat", "dog", "eel"],
        )
        assert stored.plan == row.plan


def test_finish_failed_records_the_error(db: Database, settings: Settings) -> None:
    job, _ = create(db, add_dataset(db))
    with db.sessionmaker() as session:
        assert jobs.claim(session, job.id, "w1", settings).claimed
        assert not jobs.finish_failed(session, job.id, "w2", "training_error", "boom")  # fenced
        assert jobs.finish_failed(session, job.id, "w1", "checkpoint_missing", "put it there")
    public = jobs.to_public(load(db, job.id))
    assert public["status"] == "failed"
    assert public["error"] == {"code": "checkpoint_missing", "message": "put it there"}
    assert public["finished_at"] is not None


def test_release_hands_the_job_back_without_counting_the_attempt(
    db: Database, settings: Settings
) -> None:
    dataset_id = add_dataset(db)
    job, _ = create(db, dataset_id)
    cancelled, _ = create(db, dataset_id)
    with db.sessionmaker() as session:
        assert jobs.claim(session, job.id, "w1", settings).claimed
        assert not jobs.release(session, job.id, "w2")  # fenced
        assert jobs.release(session, job.id, "w1")
        row = load(db, job.id)
        assert (row.status, row.attempts, row.worker_id, row.enqueued_at) == (
            "queued",
            0,
            None,
            None,
        )
        assert jobs.claim(session, job.id, "w3", settings).job.attempts == 1  # type: ignore[union-attr]
        # A job whose cancel was requested is not released: the worker cancels it instead.
        assert jobs.claim(session, cancelled.id, "w4", settings).claimed
        jobs.request_cancel(session, cancelled.id)
        assert not jobs.release(session, cancelled.id, "w4")
    assert load(db, cancelled.id).status == "cancelling"


def test_reconcile_repairs_lost_messages_and_silent_workers(
    db: Database, settings: Settings
) -> None:
    dataset_id = add_dataset(db)
    t0 = utcnow()
    ids = {
        name: create(db, dataset_id)[0].id
        for name in ("fresh", "old", "r1", "r2", "dead", "cx", "ok")
    }
    with db.sessionmaker() as session:
        session.execute(  # "old" was sent long ago: Redis may have lost it
            sa.update(Job).where(Job.id == ids["old"]).values(enqueued_at=t0 - timedelta(hours=1))
        )
        session.execute(sa.update(Job).where(Job.id != ids["old"]).values(enqueued_at=t0))
        session.commit()
        for name in ("r1", "r2", "dead", "cx", "ok"):
            assert jobs.claim(session, ids[name], f"w-{name}", settings, now=t0).claimed
        session.execute(sa.update(Job).where(Job.id == ids["dead"]).values(attempts=2))
        session.commit()
        jobs.request_cancel(session, ids["cx"])
        later = t0 + timedelta(seconds=settings.job_stale_after_seconds + 5)
        assert jobs.heartbeat(session, ids["ok"], "w-ok", now=later) == "ok"
        sent: list[str] = []
        report = jobs.reconcile(session, settings, sent.append, now=later)
        assert sorted(report.requeued) == sorted([ids["r1"], ids["r2"]])
        assert report.resent == [ids["old"]]
        assert report.failed == [ids["dead"]]
        assert report.cancelled == [ids["cx"]]
        assert sorted(sent) == sorted([ids["r1"], ids["r2"], ids["old"]])
        # A second pass right after finds nothing to do.
        assert not jobs.reconcile(session, settings, sent.append, now=later)
    states = {name: load(db, job_id) for name, job_id in ids.items()}
    assert {n: j.status for n, j in states.items()} == {
        "fresh": "queued",
        "old": "queued",
        "r1": "queued",
        "r2": "queued",
        "dead": "failed",
        "cx": "cancelled",
        "ok": "running",
    }
    assert states["dead"].error_code == "worker_lost"
    assert states["r1"].worker_id is None and states["r1"].attempts == 1
    assert states["r1"].enqueued_at == later
    with db.sessionmaker() as session:  # the re-queued job is claimed again: attempt 2
        again = jobs.claim(session, ids["r1"], "w-new", settings, now=later)
        assert again.claimed and again.job is not None and again.job.attempts == 2


def test_list_query_filters_by_tenant_and_status(db: Database) -> None:
    dataset_id = add_dataset(db)
    a, _ = create(db, dataset_id)
    b, _ = create(db, dataset_id)
    with db.sessionmaker() as session:
        jobs.request_cancel(session, b.id)
        assert [j.id for j in session.scalars(jobs.list_query(None, "queued"))] == [a.id]
        assert {j.id for j in session.scalars(jobs.list_query(None))} == {a.id, b.id}
        assert list(session.scalars(jobs.list_query("someone-else"))) == []
    with pytest.raises(jobs.JobError) as err:
        jobs.list_query(None, "sleeping")
    assert err.value.status == 422


def test_progress_writes_are_throttled() -> None:
    clock = [0.0]
    written: list[int] = []
    throttle = Throttled(lambda p: written.append(p["step"]), 1.0, clock=lambda: clock[0])
    for step in range(1, 11):
        clock[0] = step * 0.25
        throttle({"step": step, "total_steps": 10, "phase": "training"})
    # first report, then once per second of clock (steps 5 and 9 at t=1.25, 2.25), and the end
    assert written == [1, 5, 9, 10]
    throttle({"step": 10, "total_steps": 10, "phase": "evaluating"})
    assert written[-1] == 10 and len(written) == 5  # a new phase is always written


def test_checkpoint_interval() -> None:
    assert [checkpoint_every(n) for n in (1, 9, 40, 500, 10_000)] == [1, 1, 4, 50, 50]
