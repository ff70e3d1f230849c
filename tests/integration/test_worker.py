"""Jobs run by a REAL Celery worker process on PostgreSQL + Redis (tests/conftest.py).

Tiny model (tiny-R10x0.25, from scratch), 8 generated images, 32 px crops: a job takes
seconds on two shared CPU cores.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bitcore.artifacts import load_metadata
from service import job_runs, jobs
from service.broker import Broker
from service.db import Database, migrate
from service.settings import Settings
from service.storage import Storage
from service.tables import Job, Model
from tests.integration.worker_fixtures import (
    FAST_OVERRIDES,
    WorkerProcess,
    add_dataset,
    fast_job_settings,
    finished,
    wait_for_job,
)
from worker.runner import checkpoint_every

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


class Env:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.database_url)
        self.storage = Storage(settings.artifact_root)
        self.broker = Broker(settings)

    def create(self, dataset_id: str, **overrides: Any) -> str:
        request = jobs.JobRequest(
            dataset_id=dataset_id,
            base_model="tiny-R10x0.25",
            validation_fraction=0.25,
            overrides={**FAST_OVERRIDES, **overrides},
        )
        with self.db.sessionmaker() as session:
            job, created = jobs.create_job(
                session, request, send=self.broker.send_finetune, settings=self.settings
            )
        assert created
        return job.id

    def models_of(self, job_id: str) -> list[Model]:
        with self.db.sessionmaker() as session:
            return list(session.scalars(sa.select(Model).where(Model.job_id == job_id)))

    def history_of(self, job_id: str) -> dict[str, Any]:
        with self.db.sessionmaker() as session:
            stored = job_runs.load_history(session, job_id)
        assert stored is not None, f"job {job_id} stored no curves"
        return stored

    def close(self) -> None:
        self.broker.close()
        self.db.dispose()


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, own_database: str, redis_url: str
) -> Iterator[Env]:
    settings = fast_job_settings(
        tmp_path_factory.mktemp("worker"), database_url=own_database, broker_url=redis_url
    )
    environment = Env(settings)
    yield environment
    environment.close()


@pytest.fixture(scope="module")
def worker(env: Env) -> Iterator[WorkerProcess]:
    # prefork, as deployed: the task runs in a forked child, the reconciler in the parent.
    with WorkerProcess(env.settings, pool="prefork") as process:
        yield process


def test_a_job_runs_to_success(env: Env, worker: WorkerProcess) -> None:
    dataset_id = add_dataset(env.db, env.storage)
    job_id = env.create(dataset_id)
    seen = wait_for_job(env.db, job_id, lambda j: j.status != "queued", 60, "start", worker)
    assert seen.status in ("running", "succeeded")
    job = wait_for_job(env.db, job_id, finished, 120, "the end", worker)
    assert (job.status, job.attempts, job.error_code) == ("succeeded", 1, None)
    assert job.progress is not None
    assert (job.progress["step"], job.progress["total_steps"], job.progress["phase"]) == (
        12,
        12,
        "done",
    )
    assert job.started_at is not None and job.finished_at is not None
    assert job.started_at <= job.finished_at
    (model,) = env.models_of(job_id)
    assert model.id == job.model_id and model.metrics == job.metrics
    assert model.classes == ["a", "b"] and model.input["crop"] == 32
    # 4 images per class, 25% validation: 1 per class -> 2 validation images.
    assert job.metrics is not None and sum(job.metrics["confusion_matrix"][0]) == 1
    artifact = env.storage.path(model.storage_key)
    assert artifact == env.storage.model_dir(model.id)
    meta = load_metadata(artifact)
    assert (meta.classes, meta.crop, meta.model_name) == (["a", "b"], 32, "tiny-R10x0.25")
    assert (artifact / "model.safetensors").stat().st_size > 100_000
    # Issue 11: metadata.json carried the dataset's absolute root (and full library versions).
    document = json.loads((artifact / "metadata.json").read_text())
    assert not [v for v in _strings(document) if v.startswith("/")], document
    assert str(env.settings.artifact_root) not in json.dumps(document)
    assert "root" not in document["extra"]["dataset"]
    software = document["extra"]["software"]
    assert re.fullmatch(r"\d+\.\d+", software["torch"]) and re.fullmatch(
        r"\d+\.\d+", software["python"]
    )
    assert not env.storage.job_dir(job_id).exists()  # work dir cleaned after success
    # The curves: every one of the 12 steps, and the validation split scored at 3 points
    # inside the schedule and once at the end (that one is the model's own result).
    curves = env.history_of(job_id)
    assert [p["step"] for p in curves["training"]] == list(range(1, 13))
    assert curves["training"][0]["lr"] == 0.0 and curves["training"][-1]["lr"] is not None
    assert [p["step"] for p in curves["validation"]] == [3, 6, 9, 12]
    assert curves["validation"][-1]["accuracy"] == job.metrics["accuracy"]
    assert curves["validation"][-1]["loss"] == pytest.approx(job.metrics["loss"])


def test_cancelling_a_running_job_stops_it_and_keeps_no_model(
    env: Env, worker: WorkerProcess
) -> None:
    dataset_id = add_dataset(env.db, env.storage)
    job_id = env.create(dataset_id, steps=5000)
    wait_for_job(
        env.db,
        job_id,
        lambda j: j.status == "running" and (j.progress or {}).get("step", 0) >= 1,
        90,
        "first step",
        worker,
    )
    with env.db.sessionmaker() as session:
        assert jobs.request_cancel(session, None, job_id).status == "cancelling"
    job = wait_for_job(env.db, job_id, finished, 15, "cancelled", worker)
    assert job.status == "cancelled" and job.model_id is None
    assert job.progress is not None and job.progress["step"] < 5000
    assert env.models_of(job_id) == []
    models_dir = env.settings.artifact_root / "models"
    # No artifact directory without its model row (the database holds other tests' models too).
    assert not models_dir.exists() or set(models_dir.iterdir()) <= {
        env.storage.model_dir(m.id) for m in _all_models(env)
    }
    assert not env.storage.job_dir(job_id).exists()


def test_a_job_past_its_attempt_limit_fails(env: Env, worker: WorkerProcess) -> None:
    dataset_id = add_dataset(env.db, env.storage)
    with env.db.sessionmaker() as session:
        job, _ = jobs.create_job(
            session,
            jobs.JobRequest(dataset_id, "tiny-R10x0.25", overrides=FAST_OVERRIDES),
            send=lambda _: None,  # not sent yet: first make it look like a crash loop
            settings=env.settings,
        )
        session.execute(
            sa.update(Job).where(Job.id == job.id).values(attempts=env.settings.job_max_attempts)
        )
        session.commit()
    env.broker.send_finetune(job.id)
    done = wait_for_job(env.db, job.id, finished, 30, "failed", worker)
    assert (done.status, done.error_code, done.attempts) == (
        "failed",
        "too_many_attempts",
        env.settings.job_max_attempts,
    )
    assert env.models_of(job.id) == []


def test_a_published_model_without_its_checkpoint_fails_fast(
    env: Env, worker: WorkerProcess
) -> None:
    dataset_id = add_dataset(env.db, env.storage)
    with env.db.sessionmaker() as session:
        job, _ = jobs.create_job(
            session,
            jobs.JobRequest(dataset_id, "BiT-M-R50x1", overrides=FAST_OVERRIDES),
            send=env.broker.send_finetune,
            settings=env.settings,
        )
    done = wait_for_job(env.db, job.id, finished, 30, "failed", worker)
    assert (done.status, done.error_code) == ("failed", "checkpoint_missing")
    # What to do, naming no directory of the server's: the full path is in the worker's log.
    message = done.error_message or ""
    assert "BiT-M-R50x1.npz" in message and "BITSERVE_CHECKPOINT_DIR" in message
    assert str(env.settings.checkpoint_dir) not in message and "/" + "tmp" not in message
    expected = env.settings.checkpoint_dir / "BiT-M-R50x1.npz"
    assert str(expected) in worker.log()


def test_an_unexpected_training_failure_names_an_error_id_not_the_exception(
    env: Env, worker: WorkerProcess
) -> None:
    """Issue 11: job errors carried raw exception text ("JSONDecodeError: Expecting ...")."""
    dataset_id = add_dataset(env.db, env.storage)
    env.storage.dataset_index(dataset_id).write_text("{damaged")  # fails inside training
    job_id = env.create(dataset_id)
    done = wait_for_job(env.db, job_id, finished, 60, "failed", worker)
    assert (done.status, done.error_code) == ("failed", "training_error")
    message = done.error_message or ""
    match = re.search(r"error id (err_[a-z2-7]{20})", message)
    assert match, message
    for leak in ("JSONDecodeError", "Expecting", "Traceback", str(env.settings.artifact_root)):
        assert leak not in message
    # The operator finds the exception under that id, in one JSON record with its traceback.
    records = [json.loads(line) for line in worker.log().splitlines() if match.group(1) in line]
    errors = [r for r in records if r["level"] == "ERROR"]
    assert len(errors) == 1, records
    assert "JSONDecodeError" in errors[0]["exception"] and job_id in errors[0]["message"]


def test_a_forged_job_id_from_the_broker_is_dropped_and_logged_on_one_escaped_line(
    env: Env, worker: WorkerProcess
) -> None:
    """Issue 11: a job id from the broker was written unescaped into the worker's log, and a
    forged one injected a fake line."""
    fake_line = "[2030-01-01 00:00:00] INFO job job_aaaaaaaaaaaaaaaaaaaa succeeded: FORGED"
    env.broker.send_finetune("job_bbbbbbbbbbbbbbbbbbbb\n" + fake_line)
    env.broker.send_finetune("job_cccccccccccccccccccc\r\n" + fake_line)
    deadline = time.monotonic() + 30
    while worker.log().count("is not a job id") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = [line for line in worker.log().splitlines() if "FORGED" in line]
    # One log record per forged message (Celery's own "received" lines quote no arguments),
    # each a JSON object: the newline is inside a string, escaped, never a line of its own.
    dropped = [json.loads(line) for line in lines]
    assert [r["message"].count("FORGED") for r in dropped] == [1, 1], lines
    assert all("is not a job id" in r["message"] and r["level"] == "WARNING" for r in dropped)
    assert not any(line.startswith("[2030") for line in worker.log().splitlines())
    # The worker still takes tasks: a well-formed id of no job is refused by the claim.
    unknown = "job_dddddddddddddddddddd"
    env.broker.send_finetune(unknown)
    while f"job {unknown} not claimed" not in worker.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"job {unknown} not claimed: not_found" in worker.log()


def test_a_tampered_checkpoint_fails_the_job_as_corrupt(env: Env, worker: WorkerProcess) -> None:
    """Issue 11: the checkpoint's SHA-256, recorded at download, is checked on every use."""
    directory = env.settings.checkpoint_dir
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "BiT-M-R50x1.npz").write_bytes(b"PK\x03\x04 replaced after download")
    recorded = "0123456789abcdef" * 4
    (directory / "BiT-M-R50x1.npz.sha256").write_text(f"{recorded}  BiT-M-R50x1.npz\n")
    dataset_id = add_dataset(env.db, env.storage)
    with env.db.sessionmaker() as session:
        job, _ = jobs.create_job(
            session,
            jobs.JobRequest(dataset_id, "BiT-M-R50x1", overrides=FAST_OVERRIDES),
            send=env.broker.send_finetune,
            settings=env.settings,
        )
    done = wait_for_job(env.db, job.id, finished, 30, "failed", worker)
    assert (done.status, done.error_code) == ("failed", "checkpoint_corrupt")
    message = done.error_message or ""
    assert "BiT-M-R50x1 checkpoint on the server differs from its pinned or recorded" in message
    assert str(env.settings.checkpoint_dir) not in message  # the full text is in the log only
    assert f"not the {recorded} recorded in BiT-M-R50x1.npz.sha256" in worker.log()
    assert env.models_of(job.id) == []


@pytest.mark.slow
def test_the_embedded_setup_runs_a_job(tmp_path: Path) -> None:
    """SQLite database + kombu's SQLAlchemy broker on SQLite: `bitserve up` with no servers."""
    home = tmp_path / "home"
    settings = fast_job_settings(
        tmp_path,
        database_url=f"sqlite:///{home / 'bitserve.db'}",
        broker_url=f"sqla+sqlite:///{home / 'broker.db'}",
    )
    migrate(settings.database_url)
    embedded = Env(settings)
    try:
        dataset_id = add_dataset(embedded.db, embedded.storage)
        job_id = embedded.create(dataset_id, steps=4)
        with WorkerProcess(settings, pool="solo") as process:
            job = wait_for_job(embedded.db, job_id, finished, 120, "the end", process)
        assert (job.status, job.attempts) == ("succeeded", 1), job.error_message
        assert len(embedded.models_of(job_id)) == 1
    finally:
        embedded.close()


@pytest.mark.slow
def test_stopped_and_killed_workers_hand_the_job_on_and_it_resumes(
    env: Env, worker: WorkerProcess, tmp_path: Path
) -> None:
    """SIGTERM: the job checkpoints and goes back to the queue (attempt not counted).
    SIGKILL: the next worker's reconciler re-queues it after the stale heartbeat (4 s). Each
    worker resumes from the checkpoint in the job's work dir."""
    worker.stop()  # this test runs its own workers
    # Long enough that no worker can finish before the test stops it, whatever the machine's
    # speed: 400 steps (checkpoint_every(400) == 40) of a few tens of ms each.
    steps = 400
    every = checkpoint_every(steps)
    dataset_id = add_dataset(env.db, env.storage)
    job_id = env.create(dataset_id, steps=steps, batch_size=16)

    def past(step: int) -> Callable[[Job], bool]:
        return lambda j: j.status == "running" and (j.progress or {}).get("step", 0) >= step

    first = WorkerProcess(env.settings, log_path=tmp_path / "first.log").start()
    try:
        wait_for_job(env.db, job_id, past(2), 90, "step 2", first)
        first.stop()  # SIGTERM: warm shutdown
        assert first.proc is not None and first.proc.returncode == 0
    finally:
        first.kill()
    released = wait_for_job(env.db, job_id, lambda j: True, 1)
    assert (released.status, released.attempts, released.worker_id) == ("queued", 0, None)
    assert released.enqueued_at is not None  # sent again at once
    assert "handed back to the queue" in first.log()
    handed_back_at = int((released.progress or {}).get("step", 0))
    assert 2 <= handed_back_at < steps

    second = WorkerProcess(env.settings, log_path=tmp_path / "second.log").start()
    try:
        # Past the next periodic checkpoint, so one exists beyond the hand-back point.
        wait_for_job(env.db, job_id, past(handed_back_at + every + 2), 90, "a checkpoint", second)
    finally:
        second.kill()  # SIGKILL: a machine lost mid-job
    state_dir = env.storage.job_dir(job_id) / "state"
    assert state_dir.exists() and any(state_dir.iterdir())  # a checkpoint survived the kill
    with WorkerProcess(env.settings, log_path=tmp_path / "third.log") as third:
        job = wait_for_job(env.db, job_id, finished, 150, "the end", third)
    assert (job.status, job.attempts) == ("succeeded", 2), job.error_message
    assert job.progress is not None and job.progress["step"] == steps
    (model,) = env.models_of(job_id)
    resumed_from = load_metadata(env.storage.path(model.storage_key)).extra["resumed_from"]
    assert resumed_from is not None and handed_back_at < resumed_from < steps
    # Three attempts wrote one curve: each step once (the re-run steps replaced), in order.
    curves = env.history_of(job_id)
    assert [p["step"] for p in curves["training"]] == list(range(1, steps + 1))
    assert [p["step"] for p in curves["validation"]] == [100, 200, 300, 400]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _all_models(env: Env) -> list[Model]:
    with env.db.sessionmaker() as session:
        return list(session.scalars(sa.select(Model)))
