"""A succeeded job's `deploy_to`: point the named deployment at the new model.

Without a deployment of that name, one is made. With `deploy_if_better`, the new model and the
deployment's current target (its largest share) are both scored, as the gateway serves them,
on the job's own validation split (the same images for both), and the deployment changes only
if the new model's accuracy is strictly higher. A shadow is kept. What happened is written to
the job (`deployment`); it never fails the job: the model is there either way.

Two halves: `decide` (before the job's success is recorded: the scoring, which takes a while)
and `apply` (inside the transaction that records the model and the job's success, in a
savepoint), so a job that reads succeeded has its deployment outcome too, and the deployment
never points at a model whose row is not committed. The gateways switch once they have loaded
the new model (service.deployment_routing), so the change causes no cold start.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from bitcore.data.index import DatasetIndex
from bitcore.data.split import stratified_split
from bitcore.evaluation import evaluate_model
from service import deployments
from service.db import Database
from service.deployments import Targets
from service.domain_errors import DomainError, NotFound
from service.ids import new_id
from service.settings import Settings
from service.storage import Storage
from service.tables import Job
from worker.held_work import served_predictor

log = logging.getLogger(__name__)

CREATE, UPDATE, KEEP, FAIL = "create", "update", "keep", "fail"


@dataclass(frozen=True)
class Decision:
    """What `apply` will do, decided from the deployment as it was when the job ended."""

    name: str
    tenant_id: str | None
    job_id: str
    model_id: str
    action: str  # create | update | keep | fail
    reason: str
    version: int | None = None  # update: the version decided on (changed since: not applied)
    shadow: str | None = None
    scores: dict[str, Any] = field(default_factory=dict)


def decide(
    db: Database,
    storage: Storage,
    settings: Settings,
    job: Job,
    model_id: str,
    index: DatasetIndex,
) -> Decision | None:
    """None without deploy_to; never raises (a failure is a `fail` decision, logged)."""
    if not job.deploy_to:
        return None
    base: dict[str, Any] = {"name": job.deploy_to, "tenant_id": job.tenant_id, "job_id": job.id}
    try:
        return _decide(db, storage, settings, job, model_id, index, base)
    except DomainError as exc:  # written for clients: safe to show
        return Decision(**base, model_id=model_id, action=FAIL, reason=exc.message)
    except Exception:
        error_id = new_id("err")
        log.exception("job %s: deciding on %s failed: error %s", job.id, job.deploy_to, error_id)
        reason = f"internal error ({error_id})"
        return Decision(**base, model_id=model_id, action=FAIL, reason=reason)


def _decide(
    db: Database,
    storage: Storage,
    settings: Settings,
    job: Job,
    model_id: str,
    index: DatasetIndex,
    base: dict[str, Any],
) -> Decision:
    with db.sessionmaker() as session:
        try:
            row = deployments.get_deployment(session, job.tenant_id, job.deploy_to or "")
        except NotFound:
            return Decision(
                **base, model_id=model_id, action=CREATE, reason="the deployment was made"
            )
        current = deployments.targets_of(session, row.id)
        version = row.version
    incumbent = max(current.split, key=lambda target: target[1])[0]
    scores: dict[str, Any] = {"incumbent_model_id": incumbent}
    keep = {**base, "model_id": model_id, "action": KEEP, "version": version}
    if job.deploy_if_better:
        new, old, why_not = _accuracies(storage, settings, job, index, model_id, incumbent)
        scores |= {"accuracy": new, "incumbent_accuracy": old}
        if why_not is not None:
            return Decision(**keep, reason=why_not, scores=scores)
        assert new is not None and old is not None
        if new <= old:
            reason = (
                f"accuracy {new:.4f} does not beat the current target's {old:.4f} on the "
                "job's validation split"
            )
            return Decision(**keep, reason=reason, scores=scores)
    reason = "the new model beat the current target" if job.deploy_if_better else "asked"
    return Decision(
        **base,
        model_id=model_id,
        action=UPDATE,
        reason=reason,
        version=version,
        shadow=current.shadow,
        scores=scores,
    )


def apply(session: Session, decision: Decision) -> dict[str, Any]:
    """Carry the decision out in the caller's transaction (a savepoint: a refusal undoes only
    this); returns the outcome to record on the job."""
    d = decision
    if d.action in (KEEP, FAIL):
        return _outcome(d, "kept" if d.action == KEEP else "failed", d.version)
    try:
        with session.begin_nested():
            if d.action == CREATE:
                made = deployments.create_deployment(
                    session,
                    d.tenant_id,
                    d.name,
                    Targets(((d.model_id, 1),)),
                    d.job_id,
                    commit=False,
                )
                return _outcome(d, "created", made.version)
            changed = deployments.update_deployment(
                session,
                d.tenant_id,
                d.name,
                Targets(((d.model_id, 1),), d.shadow),
                d.job_id,
                expected_version=d.version,
                commit=False,
            )
            return _outcome(d, "updated", changed.version)
    except DomainError as exc:  # made or changed meanwhile, a shadow of other classes, ...
        return _outcome(d, "failed", d.version, reason=exc.message)


def _accuracies(
    storage: Storage,
    settings: Settings,
    job: Job,
    index: DatasetIndex,
    model_id: str,
    incumbent: str,
) -> tuple[float | None, float | None, str | None]:
    """Both models' accuracy on the job's validation split, as served; or why they cannot be
    compared (third item)."""
    _, validation = stratified_split(index.samples, job.validation_fraction, job.seed)
    if not validation:
        return None, None, "the job has no validation split to compare the models on"
    images = dataclasses.replace(index, samples=validation)
    new = served_predictor(storage, settings, model_id)
    old = served_predictor(storage, settings, incumbent)
    if list(old.classes) != list(new.classes):
        return (
            None,
            None,
            (
                f"the current target {incumbent} has other classes ({', '.join(old.classes)}): "
                "the models cannot be compared on the same images"
            ),
        )
    scored = [
        evaluate_model(predictor, images, top_k=(1,), worst=0).metrics["accuracy"]
        for predictor in (new, old)
    ]
    return float(scored[0]), float(scored[1]), None


def _outcome(
    decision: Decision, action: str, version: int | None, *, reason: str | None = None
) -> dict[str, Any]:
    return {
        "deployment": decision.name,
        "deployed": action in ("created", "updated"),
        "action": action,
        "version": version,
        "accuracy": decision.scores.get("accuracy"),
        "incumbent_model_id": decision.scores.get("incumbent_model_id"),
        "incumbent_accuracy": decision.scores.get("incumbent_accuracy"),
        "reason": reason or decision.reason,
    }
