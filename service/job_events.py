"""Event streams (GET /v1/jobs/{id}/events, GET /v1/datasets/{id}/events) through one shared
notifier per kind of resource.

Each stream used to read its job from the database every 0.5 s through the shared thread
pool: 1,500 open streams made every other request wait for a thread (GET /v1/datasets went
from 4 ms to 9.2 s). Now one task on the event loop reads every watched job in one query per
interval (one thread hop, however many streams and jobs), and wakes the streams of the jobs
that changed; a stream only compares and writes.

Also bounded here: at most `max_streams_per_key` open streams per API key (a further one is
answered 429 `too_many_streams`), and a stream lasts at most `stream_max_seconds`, then ends
with a `reconnect` event (the client opens a new one; bitserve_client does it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import sqlalchemy as sa
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from service.api_keys import Principal
from service.db import Database
from service.domain_errors import QuotaExceeded
from service.schemas import DatasetPublic, JobPublic
from service.tables import Dataset, Job

log = logging.getLogger(__name__)

# A client refused a stream retries after this long (an open one ends when its job does).
STREAM_RETRY_AFTER = 5
# What the `reconnect` event asks of an SSE client (the `retry:` field), in milliseconds.
RECONNECT_RETRY_MS = 1000


def too_many_streams(limit: int) -> QuotaExceeded:
    return QuotaExceeded(
        "too_many_streams",
        f"This API key has {limit} event streams open, the most allowed; close one, or "
        "poll the resource (GET /v1/jobs/{id}, GET /v1/datasets/{id}).",
        {"limit": limit},
        retry_after=STREAM_RETRY_AFTER,
    )


def stream_client(principal: Principal) -> str:
    """Whose streams count together: the API key's (the tenant's when keys are off)."""
    return f"key:{principal.key_id}" if principal.key_id else f"tenant:{principal.tenant_id}"


class StreamTicket:
    """One open stream of one client; release() (idempotent) gives the place back."""

    def __init__(self, counts: Counter[str], client: str) -> None:
        self._counts, self.client, self.released = counts, client, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._counts[self.client] -= 1
            if self._counts[self.client] <= 0:
                del self._counts[self.client]


class Followed(Protocol):
    """What a stream follows: a public resource with an id, an end, and a progress."""

    id: str

    @property
    def finished(self) -> bool: ...

    def model_dump(self, *, mode: str) -> dict[str, Any]: ...


R = TypeVar("R", bound=Followed)


@dataclass
class _Watch(Generic[R]):
    """A watched resource: its latest state, how many streams follow it, and an event set
    (and replaced) each time the state changes."""

    item: R
    streams: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    gone: bool = False  # its row was deleted: the streams end

    def update(self, item: R) -> None:
        if item != self.item:
            self.item = item
            self._wake()

    def vanish(self) -> None:
        if not self.gone:
            self.gone = True
            self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class Notifier(Generic[R]):
    """Streams of one kind of resource; subclasses say how to read them and their progress."""

    def __init__(
        self,
        db: Database,
        interval: float,
        max_streams_per_key: int,
        max_seconds: float,
        streams: Counter[str] | None = None,
    ) -> None:
        self.db = db
        self.interval = interval
        self.max_streams_per_key = max_streams_per_key
        self.max_seconds = max_seconds
        # Open streams per client; shared between notifiers, so the cap covers every kind.
        self.streams: Counter[str] = streams if streams is not None else Counter()
        self.polls = 0  # database reads made (one per interval while anything is watched)
        self._watches: dict[str, _Watch[R]] = {}
        self._task: asyncio.Task[None] | None = None

    async def response(
        self, principal: Principal, read_first: Callable[[], R]
    ) -> EventSourceResponse:
        """The SSE answer for one resource: a place under the key's cap first (429
        too_many_streams), then `read_first()` in a thread (its NotFound answers 404 before
        the stream starts, giving the place back)."""
        ticket = self.open_stream(stream_client(principal))
        try:
            first = await run_in_threadpool(read_first)
        except BaseException:
            ticket.release()
            raise
        # The generator releases the ticket when it ends; the background task when it never ran.
        return EventSourceResponse(
            self.events(ticket, first), ping=15, background=BackgroundTask(ticket.release)
        )

    def _read(self, ids: list[str]) -> list[R]:
        raise NotImplementedError

    def _progress(self, item: R) -> dict[str, Any] | None:
        raise NotImplementedError

    def open_stream(self, client: str) -> StreamTicket:
        """A place for one more stream of `client`, or QuotaExceeded too_many_streams."""
        if self.streams[client] >= self.max_streams_per_key:
            raise too_many_streams(self.max_streams_per_key)
        self.streams[client] += 1
        return StreamTicket(self.streams, client)

    async def events(self, ticket: StreamTicket, first: R) -> AsyncIterator[ServerSentEvent]:
        """`status` first; `progress` and `status` on changes; `done` at the end, or
        `reconnect` after max_seconds, or `deleted` when the row goes meanwhile. Cancelled by
        sse_starlette when the client leaves."""
        try:
            yield _event("status", first.model_dump(mode="json"))
            if not first.finished:
                async for event in self._follow(first):
                    yield event
            else:
                yield _event("done", first.model_dump(mode="json"))
        finally:
            ticket.release()

    async def _follow(self, first: R) -> AsyncIterator[ServerSentEvent]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_seconds
        watch = self._watch(first)
        try:
            sent = first
            while True:
                changed, item = watch.changed, watch.item
                if watch.gone:  # deleted (a dataset while it was being ingested)
                    yield _event("deleted", {"id": item.id})
                    return
                progress = self._progress(item)
                if progress is not None and progress != self._progress(sent):
                    yield _event("progress", {"id": item.id, **progress})
                if _status(item) != _status(sent):
                    yield _event("status", item.model_dump(mode="json"))
                sent = item
                if item.finished:
                    yield _event("done", item.model_dump(mode="json"))
                    return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    yield ServerSentEvent(
                        data=json.dumps({"id": item.id, "max_stream_seconds": self.max_seconds}),
                        event="reconnect",
                        retry=RECONNECT_RETRY_MS,
                    )
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await changed.wait()
        finally:
            self._unwatch(first.id)

    def _watch(self, item: R) -> _Watch[R]:
        watch = self._watches.get(item.id)
        if watch is None:
            watch = self._watches[item.id] = _Watch(item)
        watch.streams += 1
        if self._task is None or self._task.done():
            name = f"{type(self).__name__}-poll"
            self._task = asyncio.get_running_loop().create_task(self._poll(), name=name)
        return watch

    def _unwatch(self, item_id: str) -> None:
        watch = self._watches.get(item_id)
        if watch is not None:
            watch.streams -= 1
            if watch.streams <= 0:
                del self._watches[item_id]

    async def _poll(self) -> None:
        """Every interval, while anything is watched: one query for all of it."""
        failing = False
        while self._watches:
            await asyncio.sleep(self.interval)
            ids = list(self._watches)
            if not ids:
                break
            try:
                items = await run_in_threadpool(self._read, ids)
            except Exception:  # the database is down: streams wait, the next turn retries
                if not failing:  # once per outage, not every interval
                    log.warning("events: reading %d item(s) failed", len(ids), exc_info=True)
                failing = True
                continue
            if failing:
                log.info("events: reading again")
            failing = False
            self.polls += 1
            for item in items:
                watch = self._watches.get(item.id)
                if watch is not None:
                    watch.update(item)
            for missing in set(ids) - {item.id for item in items}:
                watch = self._watches.get(missing)
                if watch is not None:
                    watch.vanish()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class JobNotifier(Notifier[JobPublic]):
    def _read(self, ids: list[str]) -> list[JobPublic]:
        with self.db.sessionmaker() as session:
            rows = session.scalars(sa.select(Job).where(Job.id.in_(ids))).all()
            return [JobPublic.from_row(row) for row in rows]

    def _progress(self, item: JobPublic) -> dict[str, Any] | None:
        return asdict(item.progress)


class DatasetNotifier(Notifier[DatasetPublic]):
    """A dataset's ingestion: `progress` is its IngestProgress while processing."""

    def _read(self, ids: list[str]) -> list[DatasetPublic]:
        with self.db.sessionmaker() as session:
            rows = session.scalars(sa.select(Dataset).where(Dataset.id.in_(ids))).all()
            return [DatasetPublic.from_row(row) for row in rows]

    def _progress(self, item: DatasetPublic) -> dict[str, Any] | None:
        return None if item.progress is None else item.progress.model_dump(mode="json")


def _status(item: Followed) -> Any:
    return getattr(item, "status", None)


def _event(name: str, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data), event=name)
