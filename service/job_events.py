"""Job event streams (GET /v1/jobs/{id}/events) through one shared notifier.

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
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sse_starlette import ServerSentEvent
from starlette.concurrency import run_in_threadpool

from service.api_keys import Principal
from service.db import Database
from service.domain_errors import QuotaExceeded
from service.schemas import JobPublic
from service.tables import Job

log = logging.getLogger(__name__)

# A client refused a stream retries after this long (an open one ends when its job does).
STREAM_RETRY_AFTER = 5
# What the `reconnect` event asks of an SSE client (the `retry:` field), in milliseconds.
RECONNECT_RETRY_MS = 1000


def too_many_streams(limit: int) -> QuotaExceeded:
    return QuotaExceeded(
        "too_many_streams",
        f"This API key has {limit} job event streams open, the most allowed; close one, or "
        "poll GET /v1/jobs/{id}.",
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


@dataclass
class _Watch:
    """A watched job: its latest state, how many streams follow it, and an event set (and
    replaced) each time the state changes."""

    job: JobPublic
    streams: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def update(self, job: JobPublic) -> None:
        if job != self.job:
            self.job = job
            self.changed.set()
            self.changed = asyncio.Event()


class JobNotifier:
    def __init__(
        self, db: Database, interval: float, max_streams_per_key: int, max_seconds: float
    ) -> None:
        self.db = db
        self.interval = interval
        self.max_streams_per_key = max_streams_per_key
        self.max_seconds = max_seconds
        self.streams: Counter[str] = Counter()  # open streams per client
        self.polls = 0  # database reads made (one per interval while any job is watched)
        self._watches: dict[str, _Watch] = {}
        self._task: asyncio.Task[None] | None = None

    def open_stream(self, client: str) -> StreamTicket:
        """A place for one more stream of `client`, or QuotaExceeded too_many_streams."""
        if self.streams[client] >= self.max_streams_per_key:
            raise too_many_streams(self.max_streams_per_key)
        self.streams[client] += 1
        return StreamTicket(self.streams, client)

    async def events(self, ticket: StreamTicket, job: JobPublic) -> AsyncIterator[ServerSentEvent]:
        """`status` first; `progress` and `status` on changes; `done` at the end, or
        `reconnect` after max_seconds. Cancelled by sse_starlette when the client leaves."""
        try:
            yield _event("status", job.model_dump(mode="json"))
            if not job.status.finished:
                async for event in self._follow(job):
                    yield event
            else:
                yield _event("done", job.model_dump(mode="json"))
        finally:
            ticket.release()

    async def _follow(self, first: JobPublic) -> AsyncIterator[ServerSentEvent]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_seconds
        watch = self._watch(first)
        try:
            sent = first
            while True:
                changed, job = watch.changed, watch.job
                if job.progress != sent.progress:
                    yield _event("progress", {"id": job.id, **asdict(job.progress)})
                if job.status != sent.status:
                    yield _event("status", job.model_dump(mode="json"))
                sent = job
                if job.status.finished:
                    yield _event("done", job.model_dump(mode="json"))
                    return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    yield ServerSentEvent(
                        data=json.dumps({"id": job.id, "max_stream_seconds": self.max_seconds}),
                        event="reconnect",
                        retry=RECONNECT_RETRY_MS,
                    )
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await changed.wait()
        finally:
            self._unwatch(first.id)

    def _watch(self, job: JobPublic) -> _Watch:
        watch = self._watches.get(job.id)
        if watch is None:
            watch = self._watches[job.id] = _Watch(job)
        watch.streams += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="job-events")
        return watch

    def _unwatch(self, job_id: str) -> None:
        watch = self._watches.get(job_id)
        if watch is not None:
            watch.streams -= 1
            if watch.streams <= 0:
                del self._watches[job_id]

    async def _poll(self) -> None:
        """Every interval, while any job is watched: one query for all of them."""
        failing = False
        while self._watches:
            await asyncio.sleep(self.interval)
            ids = list(self._watches)
            if not ids:
                break
            try:
                jobs = await run_in_threadpool(self._read, ids)
            except Exception:  # the database is down: streams wait, the next turn retries
                if not failing:  # once per outage, not every interval
                    log.warning("job events: reading %d job(s) failed", len(ids), exc_info=True)
                failing = True
                continue
            if failing:
                log.info("job events: reading jobs again")
            failing = False
            self.polls += 1
            for job in jobs:
                watch = self._watches.get(job.id)
                if watch is not None:
                    watch.update(job)

    def _read(self, ids: list[str]) -> list[JobPublic]:
        with self.db.sessionmaker() as session:
            rows = session.scalars(sa.select(Job).where(Job.id.in_(ids))).all()
            return [JobPublic.from_row(row) for row in rows]

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _event(name: str, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data), event=name)
