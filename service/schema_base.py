"""The two kinds of public shape (service.schemas, service.plan_schemas): a response or request
that refuses unknown fields, and a sub-object read from a JSON column that ignores them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, PlainSerializer

from service.ids import rfc3339

# RFC 3339 in UTC with a Z suffix, as every time in the API.
Timestamp = Annotated[datetime, PlainSerializer(rfc3339, return_type=str)]


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stored(BaseModel):
    """A sub-object read from a JSON column: unknown keys are ignored, not refused."""

    model_config = ConfigDict(extra="ignore")
