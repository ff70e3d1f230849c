"""A real Celery worker process for integration and e2e tests, plus the helpers around it.

`WorkerProcess` runs `celery -A worker.celery_app worker` in a subprocess whose environment
carries the same Settings the test uses (database, broker, store, fast heartbeats), on a train
queue of its own so several test modules (or a stray worker) never take each other's jobs.

    settings = fast_job_settings(tmp_path, database_url=postgres_url, broker_url=redis_url)
    with WorkerProcess(settings) as worker:   # waits until the worker says "ready"
        ...                                   # send jobs (service.broker.Broker(settings))
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bitcore.data.index import index_directory
from service.cli import WORKER_ROLES, worker_command
from service.db import Database
from service.ids import new_id
from service.settings import Settings
from service.storage import Storage
from service.tables import Dataset, Job
from tests.imagegen import make_image_folder

REPO_ROOT = Path(__file__).resolve().parents[2]
# Jobs of tenant "default" left queued by any test module (servers without a worker) must not
# reach another module's quota: the integration tests share one database.
TESTS_MAX_ACTIVE_JOBS = 10_000
# Overrides that make a tiny-R10x0.25 job take seconds on a shared 2-core CPU.
FAST_OVERRIDES: dict[str, Any] = {"steps": 12, "batch_size": 4, "crop": 32, "precrop": 40}
ALIASES = {  # environment names that could shadow BITSERVE_* ones: set them all alike
    "database_url": ("DATABASE_URL",),
    "broker_url": ("CELERY_BROKER_URL", "REDIS_URL"),
}


def fast_job_settings(
    tmp_path: Path, *, database_url: str, broker_url: str, **overrides: Any
) -> Settings:
    """Settings for tests: fast heartbeats, stale after 4 s, a private queue, CPU, no downloads."""
    values: dict[str, Any] = {
        "home": tmp_path / "home",
        "database_url": database_url,
        "broker_url": broker_url,
        "artifact_root": tmp_path / "store",
        "checkpoint_dir": tmp_path / "checkpoints",
        "allow_downloads": False,
        "device": "cpu",
        "train_queue": f"train-{uuid.uuid4().hex[:8]}",
        "ingest_queue": f"ingest-{uuid.uuid4().hex[:8]}",
        "job_heartbeat_seconds": 0.5,
        "job_stale_after_seconds": 4.0,
        "job_progress_interval_seconds": 0.2,
        "reconcile_interval_seconds": 1.0,
        "job_max_attempts": 3,
        "auto_migrate": False,
        "tenant_max_active_jobs": TESTS_MAX_ACTIVE_JOBS,
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment from which the worker's get_settings() rebuilds exactly `settings`."""
    env = {
        k: v
        for k, v in (base if base is not None else os.environ).items()
        if not k.startswith("BITSERVE_")
        and k not in ("DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL")
    }
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, dict | list | tuple):
            text = json.dumps(value, default=str)  # pydantic-settings parses JSON for these
        else:
            text = str(value)
        env[f"BITSERVE_{name.upper()}"] = text
        for alias in ALIASES.get(name, ()):
            env[alias] = text
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


class WorkerProcess:
    """`celery -A worker.celery_app worker -Q <the queues of roles>` as a child process: by
    default both the train and the ingest queue of `settings`, as `bitserve worker` runs."""

    def __init__(
        self,
        settings: Settings,
        *,
        pool: str = "solo",
        roles: tuple[str, ...] = WORKER_ROLES,
        log_path: Path | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.roles = roles
        self.ready_timeout = ready_timeout
        self.log_path = log_path or settings.home / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The product's own launch command (what `bitserve worker` / `bitserve up` run).
        command = worker_command(
            self.settings,
            roles=self.roles,
            pool=self.pool,
            name=f"test-{uuid.uuid4().hex[:6]}@%h",
        )
        with open(self.log_path, "ab") as log:
            # A session of its own: kill() takes the prefork children down with the parent.
            self.proc = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=settings_env(self.settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if "ready." in self.log():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"celery worker exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.2)
        raise TimeoutError(f"celery worker not ready in {self.ready_timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes: a machine lost mid-job."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def add_dataset(
    db: Database,
    storage: Storage,
    classes: Mapping[str, int] | None = None,
    size: tuple[int, int] = (40, 48),
    tenant_id: str | None = None,
) -> str:
    """A ready dataset as the upload path leaves it: images, index.json, and the row."""
    dataset_id = new_id("ds")
    folder = storage.dataset_dir(dataset_id)
    files = make_image_folder(folder / "files", classes or {"a": 4, "b": 4}, size=size)
    index = index_directory(files)
    index.save(folder / "index.json")
    with db.sessionmaker() as session:
        session.add(
            Dataset(
                id=dataset_id,
                tenant_id=tenant_id,
                name="generated",
                status="ready",
                num_images=index.num_images,
                num_classes=len(index.classes),
                classes=[{"name": k, "count": v} for k, v in index.counts().items()],
                image_size={
                    "median_height": index.median_size[0],
                    "median_width": index.median_size[1],
                },
                rejected=[],
                bytes=0,
                storage_key=storage.key(folder),
            )
        )
        session.commit()
    return dataset_id


def wait_for_job(
    db: Database,
    job_id: str,
    until: Callable[[Job], bool],
    timeout: float,
    what: str = "condition",
    worker: WorkerProcess | None = None,
) -> Job:
    """Poll the job row until `until(job)`; fail with the job and the worker's log if not."""
    deadline = time.monotonic() + timeout
    job: Job | None = None
    while time.monotonic() < deadline:
        with db.sessionmaker() as session:
            job = session.get(Job, job_id)
        if job is not None and until(job):
            return job
        time.sleep(0.2)
    state = (
        None
        if job is None
        else (job.status, job.attempts, job.progress, job.error_code, job.error_message)
    )
    log = worker.log()[-4000:] if worker is not None else ""
    raise AssertionError(f"job {job_id}: {what} not reached in {timeout} s; last {state}\n{log}")


def finished(job: Job) -> bool:
    return job.status in ("succeeded", "failed", "cancelled")
