"""API keys: made, checked, listed and revoked. Plain functions; the web layer calls
`authenticate` on every /v1 request (service.auth).

A key reads `bsk_<key id>_<secret>`: the recognisable prefix lets secret scanners find
leaked keys; the key id (20 base32 characters, the row's id without "key_") finds the row
without a search; the secret is 32 random bytes (256 bits). Only HMAC-SHA256(pepper, secret) is
stored, and compared in constant time. A fast keyed hash is enough for a high-entropy token
(no password KDF): nobody can guess 2^256 secrets, whatever the hash costs. The pepper
(BITSERVE_API_KEY_PEPPER) keeps a stolen database copy from even confirming a key; it must be
the same on every gateway and wherever `bitserve keys` runs.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.domain_errors import Forbidden, InvalidRequest, NotFound, Unauthenticated
from service.ids import ID_LENGTH, new_id, utcnow
from service.tables import ApiKey

KEY_PREFIX = "bsk_"
SECRET_BYTES = 32
DEFAULT_PEPPER = b"bitserve-api-key-v1"  # with no pepper set: still a fixed-length digest
DEFAULT_TENANT = "default"
# last_used_at is written at most this often per key: not a database write per request.
LAST_USED_RESOLUTION = timedelta(minutes=1)
# fullmatch: "$" would let a trailing newline through ("acme\n").
TENANT_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_TOKEN = re.compile(
    rf"^{KEY_PREFIX}(?P<id>[a-z2-7]{{{ID_LENGTH}}})_(?P<secret>[A-Za-z0-9_-]{{43}})$"
)


class Scope(StrEnum):
    """What a key may do. admin includes the others; train and predict are apart, so a key
    that serves predictions cannot train or delete, and a training pipeline's key cannot
    spend the serving capacity (a key may hold both)."""

    ADMIN = "admin"  # keys, quotas, the audit trail, and everything else
    TRAIN = "train"  # datasets, jobs, models: read and write
    PREDICT = "predict"  # list and read models, and predict


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key (None when auth is off), its tenant and scopes."""

    tenant_id: str
    scopes: frozenset[Scope]
    key_id: str | None = None
    global_admin: bool = False
    expires_at: datetime | None = None

    def allows(self, accepted: frozenset[Scope]) -> bool:
        """True when the key holds one of the `accepted` scopes (admin holds them all)."""
        return Scope.ADMIN in self.scopes or bool(self.scopes & accepted)


@dataclass(frozen=True)
class NewKey:
    row: ApiKey
    token: str  # shown once; never stored


def hash_secret(secret: str, pepper: bytes | None) -> str:
    return hmac.new(pepper or DEFAULT_PEPPER, secret.encode(), hashlib.sha256).hexdigest()


def check_tenant(name: str) -> str:
    if not TENANT_PATTERN.fullmatch(name):
        raise InvalidRequest(
            "invalid_request",
            "a tenant name is 1-64 characters: lower-case letters, digits, '.', '_', '-', "
            f"starting with a letter or digit; got {name!r}",
            {"field": "tenant"},
        )
    return name


def create_key(
    session: Session,
    *,
    tenant_id: str,
    scopes: list[Scope] | tuple[Scope, ...],
    pepper: bytes | None,
    name: str | None = None,
    expires_in: timedelta | None = None,
    global_admin: bool = False,
    created_by: str | None = None,
    now: datetime | None = None,
) -> NewKey:
    """A new key (committed). Its token is in the result only: show it once."""
    now = now or utcnow()
    if not scopes:
        raise InvalidRequest(
            "invalid_request", "a key needs at least one scope", {"field": "scopes"}
        )
    if global_admin and Scope.ADMIN not in scopes:
        raise InvalidRequest(
            "invalid_request", "a global admin key needs the admin scope", {"field": "scopes"}
        )
    if expires_in is not None and expires_in <= timedelta(0):
        raise InvalidRequest(
            "invalid_request", "expiry must be in the future", {"field": "expires"}
        )
    key_id = new_id("key")
    secret = secrets.token_urlsafe(SECRET_BYTES)
    row = ApiKey(
        id=key_id,
        tenant_id=check_tenant(tenant_id),
        name=name,
        scopes=sorted({Scope(s).value for s in scopes}),
        global_admin=global_admin,
        secret_hash=hash_secret(secret, pepper),
        created_by=created_by,
        created_at=now,
        expires_at=now + expires_in if expires_in is not None else None,
    )
    session.add(row)
    session.commit()
    return NewKey(row, f"{KEY_PREFIX}{key_id.removeprefix('key_')}_{secret}")


def authenticate(
    session: Session, token: str | None, pepper: bytes | None, now: datetime | None = None
) -> Principal:
    """The caller of `token`; Unauthenticated for a missing, malformed, unknown, wrong,
    expired or revoked key. The message never repeats the token."""
    if not token:
        raise Unauthenticated(
            "missing_api_key",
            "this route needs an API key: send `Authorization: Bearer <key>` (or `X-API-Key`)",
        )
    match = _TOKEN.match(token)
    row = session.get(ApiKey, f"key_{match['id']}") if match else None
    expected = row.secret_hash if row is not None else hash_secret("", pepper)
    given = hash_secret(match["secret"] if match else token, pepper)
    # Compared even for an unknown id, so timing does not tell unknown from wrong.
    if not hmac.compare_digest(expected, given) or row is None:
        raise Unauthenticated("invalid_api_key", "the API key is not valid")
    now = now or utcnow()
    if row.revoked_at is not None:
        raise Unauthenticated("invalid_api_key", "the API key was revoked")
    if row.expires_at is not None and row.expires_at <= now:
        raise Unauthenticated("invalid_api_key", "the API key has expired")
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
        session.execute(sa.update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now))
        session.commit()
    return Principal(
        tenant_id=row.tenant_id,
        scopes=frozenset(Scope(s) for s in row.scopes),
        key_id=row.id,
        global_admin=row.global_admin,
        expires_at=row.expires_at,
    )


def require(principal: Principal, accepted: frozenset[Scope]) -> None:
    """Forbidden unless the key holds one of the `accepted` scopes."""
    if not principal.allows(accepted):
        needed = " or ".join(repr(s.value) for s in sorted(accepted))
        raise Forbidden(
            "insufficient_scope",
            f"this API key lacks the {needed} scope this route needs",
            {
                "needed": sorted(s.value for s in accepted),
                "scopes": sorted(s.value for s in principal.scopes),
            },
        )


def visible_tenant(principal: Principal, tenant_id: str | None, what: str = "keys") -> str | None:
    """The tenant whose keys (or audit events, ...: `what`) an admin may see or manage: its
    own, or (a global admin) any one it names, or all (None)."""
    if principal.global_admin:
        return tenant_id
    if tenant_id is not None and tenant_id != principal.tenant_id:
        raise Forbidden(
            "insufficient_scope",
            f"only a global admin key sees or manages another tenant's {what}",
            {"tenant": tenant_id},
        )
    return principal.tenant_id


def list_keys(tenant_id: str | None) -> sa.Select[ApiKey]:
    """Keys of one tenant, or of all (None); paginate it with service.pagination."""
    query = sa.select(ApiKey)
    return query if tenant_id is None else query.where(ApiKey.tenant_id == tenant_id)


def get_key(session: Session, tenant_id: str | None, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound("key", key_id)
    return row


def revoke_key(
    session: Session, tenant_id: str | None, key_id: str, now: datetime | None = None
) -> ApiKey:
    """Revoke (idempotent: a revoked key stays revoked at its first time)."""
    row = get_key(session, tenant_id, key_id)
    if row.revoked_at is None:
        row.revoked_at = now or utcnow()
        session.commit()
    return row
