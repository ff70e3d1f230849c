"""Deployments: a tenant's stable names for served models.

    pets -> mdl_a                        one target
    pets -> mdl_a x 90, mdl_b x 10       a split by weight (a canary)
    pets -> ... + shadow mdl_c           mdl_c gets a copy of each request, answers recorded only

Every change (create, update, rollback) bumps `version` and is kept in `deployment_changes`
with who made it, from what, to what; a rollback goes back to what the latest change replaced.
The database is the source of truth; gateways resolve names through
service.deployment_routing, which warms a new target before it moves its pointer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.domain_errors import Conflict, InvalidRequest, NotFound
from service.ids import new_id, utcnow
from service.models_store import get_model
from service.tables import Deployment, DeploymentChange, DeploymentTarget, Model, tenant_is

TARGET, SHADOW = "target", "shadow"
CREATED, UPDATED, ROLLED_BACK = "created", "updated", "rolled_back"
MAX_TARGETS = 5
# A DNS label (RFC 1123): what a name that may end up in a host name or a path must be.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


@dataclass(frozen=True)
class Targets:
    """What a deployment points at: (model_id, weight) in the caller's order, and a shadow."""

    split: tuple[tuple[str, int], ...]
    shadow: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "targets": [{"model_id": m, "weight": w} for m, w in self.split],
            "shadow_model_id": self.shadow,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Targets:
        split = tuple((t["model_id"], int(t["weight"])) for t in data["targets"])
        return cls(split, data.get("shadow_model_id"))

    @property
    def model_ids(self) -> list[str]:
        return [m for m, _ in self.split] + ([self.shadow] if self.shadow else [])


def get_deployment(session: Session, tenant_id: str | None, name: str) -> Deployment:
    row = session.scalars(
        sa.select(Deployment).where(
            tenant_is(Deployment.tenant_id, tenant_id), Deployment.name == name
        )
    ).one_or_none()
    if row is None:
        raise NotFound("deployment", name)
    return row


def list_deployments(tenant_id: str | None) -> sa.Select[Deployment]:
    return sa.select(Deployment).where(tenant_is(Deployment.tenant_id, tenant_id))


def targets_of(session: Session, deployment_id: str) -> Targets:
    rows = session.scalars(
        sa.select(DeploymentTarget)
        .where(DeploymentTarget.deployment_id == deployment_id)
        .order_by(DeploymentTarget.position)
    ).all()
    split = tuple((r.model_id, r.weight) for r in rows if r.role == TARGET)
    shadow = next((r.model_id for r in rows if r.role == SHADOW), None)
    return Targets(split, shadow)


def check_targets(session: Session, tenant_id: str | None, targets: Targets) -> list[Model]:
    """The tenant's models behind `targets` (NotFound otherwise); a split and its shadow must
    answer with the same labels, or comparing them (and the answers) means nothing."""
    ids = [m for m, _ in targets.split]
    if len(set(ids)) != len(ids):
        raise InvalidRequest(
            "invalid_request", "a model appears twice among the targets", {"targets": ids}
        )
    if targets.shadow in ids:
        raise InvalidRequest(
            "invalid_request",
            f"model {targets.shadow} cannot be both a target and the shadow",
            {"shadow_model_id": targets.shadow},
        )
    models = [get_model(session, tenant_id, model_id) for model_id in targets.model_ids]
    if len(models) > 1:
        first = list(models[0].classes)
        differing = [m.id for m in models[1:] if list(m.classes) != first]
        if differing:
            raise InvalidRequest(
                "classes_differ",
                f"models {', '.join(differing)} do not have the classes of {models[0].id} "
                f"({', '.join(first)}); a split or a shadow compares models that answer with "
                "the same labels",
                {"model_id": models[0].id, "classes": first, "differing": differing},
            )
    return models


def create_deployment(
    session: Session,
    tenant_id: str | None,
    name: str,
    targets: Targets,
    actor: str | None,
    *,
    commit: bool = True,
) -> Deployment:
    """Made and recorded (committed unless `commit` is False: a caller's transaction)."""
    check_targets(session, tenant_id, targets)
    taken = session.scalars(
        sa.select(Deployment.id).where(
            tenant_is(Deployment.tenant_id, tenant_id), Deployment.name == name
        )
    ).first()
    if taken is not None:
        raise _exists(name)
    now = utcnow()
    row = Deployment(
        id=new_id("dep"), tenant_id=tenant_id, name=name, version=1, created_at=now, updated_at=now
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:  # made by a concurrent request since the check
        if commit:
            session.rollback()
        raise _exists(name) from None
    _write_targets(session, row.id, targets)
    _record(session, row, CREATED, actor, None, targets)
    _finish(session, commit)
    return row


def update_deployment(
    session: Session,
    tenant_id: str | None,
    name: str,
    targets: Targets,
    actor: str | None,
    *,
    action: str = UPDATED,
    expected_version: int | None = None,
    commit: bool = True,
) -> Deployment:
    """Point `name` at `targets` (a no-op when they are what it points at). With
    `expected_version`, refuse (409 version_changed) if another change landed first."""
    check_targets(session, tenant_id, targets)
    row = _locked(session, tenant_id, name)
    if expected_version is not None and row.version != expected_version:
        raise Conflict(
            "version_changed",
            f"deployment {name} changed meanwhile (now version {row.version}); read it again",
            {"version": row.version},
        )
    before = targets_of(session, row.id)
    if before == targets:
        if commit:
            session.rollback()  # releases the row lock
        return row
    row.version += 1
    row.updated_at = utcnow()
    session.execute(sa.delete(DeploymentTarget).where(DeploymentTarget.deployment_id == row.id))
    _write_targets(session, row.id, targets)
    _record(session, row, action, actor, before, targets)
    _finish(session, commit)
    return row


def previous_targets(session: Session, tenant_id: str | None, name: str) -> tuple[Targets, int]:
    """What the latest change replaced (a rollback's destination) and the version it applies
    to; 409 nothing_to_roll_back for a deployment never changed since it was created."""
    row = get_deployment(session, tenant_id, name)
    latest = session.scalars(
        sa.select(DeploymentChange)
        .where(DeploymentChange.deployment_id == row.id)
        .order_by(DeploymentChange.version.desc())
        .limit(1)
    ).one()
    if latest.before is None:
        raise Conflict(
            "nothing_to_roll_back",
            f"deployment {name} has not changed since it was created: there is nothing to "
            "roll back to",
            {"version": row.version},
        )
    return Targets.from_dict(latest.before), row.version


def delete_deployment(session: Session, tenant_id: str | None, name: str) -> Deployment:
    row = get_deployment(session, tenant_id, name)
    session.delete(row)
    session.commit()
    return row


def history(session: Session, deployment: Deployment) -> sa.Select[DeploymentChange]:
    return sa.select(DeploymentChange).where(DeploymentChange.deployment_id == deployment.id)


def _locked(session: Session, tenant_id: str | None, name: str) -> Deployment:
    # The row lock orders concurrent changes of one deployment (each sees the other's version).
    row = session.scalars(
        sa.select(Deployment)
        .where(tenant_is(Deployment.tenant_id, tenant_id), Deployment.name == name)
        .with_for_update()
    ).one_or_none()
    if row is None:
        raise NotFound("deployment", name)
    return row


def _write_targets(session: Session, deployment_id: str, targets: Targets) -> None:
    for position, (model_id, weight) in enumerate(targets.split):
        session.add(
            DeploymentTarget(
                deployment_id=deployment_id,
                role=TARGET,
                model_id=model_id,
                weight=weight,
                position=position,
            )
        )
    if targets.shadow:
        session.add(
            DeploymentTarget(
                deployment_id=deployment_id,
                role=SHADOW,
                model_id=targets.shadow,
                weight=0,
                position=len(targets.split),
            )
        )


def _record(
    session: Session,
    row: Deployment,
    action: str,
    actor: str | None,
    before: Targets | None,
    after: Targets,
) -> None:
    session.add(
        DeploymentChange(
            id=new_id("depc"),
            deployment_id=row.id,
            version=row.version,
            action=action,
            actor=actor,
            before=before.as_dict() if before else None,
            after=after.as_dict(),
            created_at=row.updated_at,
        )
    )


def _finish(session: Session, commit: bool) -> None:
    if commit:
        session.commit()
    else:
        session.flush()


def _exists(name: str) -> Conflict:
    return Conflict(
        "deployment_exists",
        f"deployment {name} already exists: change it with PATCH /v1/deployments/{name}",
        {"name": name},
    )
