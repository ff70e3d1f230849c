"""Publish a model the way a finished job does, without training: for tests and benchmarks.

The artifact is a real bitcore artifact (any weights the caller chooses); the rows are written
by the product's own code: a running job, then service.job_runs.finish_succeeded, which adds
the model row in the transaction that marks the job succeeded (the one model-row writer).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import torch

from bitcore import hyperrule
from bitcore.artifacts import ArtifactMetadata, save_artifact
from service import job_runs, models_store
from service.api_keys import DEFAULT_TENANT
from service.db import Database
from service.ids import new_id, utcnow
from service.job_states import JobStatus
from service.storage import Storage
from service.tables import Job

WORKER = "tests.model_fixtures"


def fixture_plan(crop: int) -> dict[str, Any]:
    """A real HyperRule plan (as a job stores it) for a small dataset at `crop` px."""
    plan = hyperrule.plan(24, (crop, crop), crop=crop, precrop=crop, steps=12, batch_size=8)
    body = plan.to_dict()
    body["source"]["from_scratch"] = True
    return body


def publish_model(
    db: Database,
    storage: Storage,
    model: torch.nn.Module,
    base_model: str,
    classes: list[str],
    crop: int,
    *,
    metrics: dict[str, Any] | None = None,
    tenant_id: str = DEFAULT_TENANT,
    name: str | None = None,
    created_at: datetime | None = None,
) -> tuple[str, str]:
    """Save `model` as an artifact and publish it through a succeeded job: (model id, job id)."""
    now = created_at or utcnow()
    plan = fixture_plan(crop)
    model_id, job_id = models_store.new_model_id(), new_id("job")
    meta = ArtifactMetadata(base_model, classes, crop, plan=plan, metrics=dict(metrics or {}))
    directory = storage.model_dir(model_id)
    save_artifact(directory, model, meta)
    with db.sessionmaker() as session:
        session.add(
            Job(
                id=job_id,
                tenant_id=tenant_id,
                dataset_id=None,
                base_model=base_model,
                name=name,
                status=JobStatus.RUNNING,
                plan=plan,
                overrides={},
                worker_id=WORKER,
                attempts=1,
                created_at=now,
                started_at=now,
                heartbeat_at=now,
            )
        )
        session.commit()
        published = job_runs.finish_succeeded(
            session,
            job_id,
            WORKER,
            models_store.TrainedModel.from_artifact(storage, model_id, dict(metrics or {})),
            now=now,
        )
    assert published is not None, "finish_succeeded refused the fixture's job"
    return model_id, job_id
