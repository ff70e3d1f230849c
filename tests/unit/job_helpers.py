"""Helpers of the job state-machine tests: add a dataset row, create a job, read a job."""

from __future__ import annotations

from service import jobs
from service.db import Database
from service.ids import new_id
from service.settings import Settings
from service.tables import Dataset, Job, Model

CLASSES = [{"name": "cat", "count": 7}, {"name": "dog", "count": 5}, {"name": "eel", "count": 2}]
# The state-machine tests create many jobs of one tenant: no quota in their way.
NO_QUOTA = Settings(tenant_max_active_jobs=1_000_000)


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
            session,
            request,
            send=outbox.append,
            settings=NO_QUOTA,
            tenant_id=tenant,
            idempotency_key=key,
        )


def load(db: Database, job_id: str) -> Job:
    with db.sessionmaker() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def add_model(
    db: Database,
    tenant: str | None = None,
    classes: tuple[str, ...] = ("cat", "dog", "eel"),
) -> str:
    """A model row (no artifact: for the state machines that never load it)."""
    model_id = new_id("mdl")
    with db.sessionmaker() as session:
        session.add(
            Model(
                id=model_id,
                tenant_id=tenant,
                job_id=None,
                base_model="tiny-R10x0.25",
                classes=list(classes),
                plan={},
                metrics=None,
                input={"crop": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
                storage_key=f"models/{model_id}",
            )
        )
        session.commit()
    return model_id
