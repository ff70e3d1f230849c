"""Keyset pagination, newest first, with an opaque cursor (base64 of created_at + id).

Keyset rather than OFFSET: pages stay stable while rows are inserted, and each page costs an
index range scan however deep the client goes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

import sqlalchemy as sa
from fastapi import Query
from sqlalchemy.orm import Session

from service.domain_errors import MalformedRequest
from service.schemas import Page

T = TypeVar("T")
Item = TypeVar("Item")
DEFAULT_LIMIT = 20
MAX_LIMIT = 100

LimitQuery = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="items per page")]
CursorQuery = Annotated[
    str | None, Query(max_length=200, description="next_cursor of the previous page")
]


def encode_cursor(created_at: datetime, object_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), object_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, object_id = json.loads(raw)
        return datetime.fromisoformat(created), str(object_id)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise MalformedRequest(
            "invalid_cursor", "cursor is not one this API returned; start again without it"
        ) from None


def page(
    session: Session,
    query: sa.Select[T],
    limit: int,
    cursor: str | None,
    public: Callable[[T], Item],
) -> Page[Item]:
    """One page of `query`, each row turned into its public schema by `public`."""
    rows, next_cursor = paginate(session, query, limit, cursor)
    return Page(items=[public(row) for row in rows], next_cursor=next_cursor)


def paginate(
    session: Session,
    query: sa.Select[T],
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> tuple[list[T], str | None]:
    """One page of `query` (a select of one ORM entity with `created_at` and `id`).

    Returns (items, next_cursor); next_cursor is None on the last page.
    """
    entity: Any = query.column_descriptions[0]["entity"]
    created, ident = entity.created_at, entity.id
    if cursor:
        at, last_id = decode_cursor(cursor)
        query = query.where(sa.or_(created < at, sa.and_(created == at, ident < last_id)))
    rows = list(session.scalars(query.order_by(created.desc(), ident.desc()).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    last: Any = rows[-1]
    return rows, encode_cursor(last.created_at, last.id)
