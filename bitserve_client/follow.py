"""Following a job or a dataset to its end: its Server-Sent Events stream, else polling.

Jobs (GET /v1/jobs/{id}/events) and datasets being ingested (GET /v1/datasets/{id}/events)
stream the same events: `status` (the whole object) first and on each change, `progress` (its
progress plus its `id`) when that changes, a final `done` (the finished object), or `reconnect`
when the stream reached the server's lifetime. The stream is read with httpx-sse; a new one is
opened on `reconnect`; if it cannot be opened (e.g. 429 too_many_streams) or breaks off, the
object is polled instead and the same events are made from the changes seen.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import EventSource

from bitserve_client.errors import ApiError
from bitserve_client.schema import JobEvent

# Longer than the server's SSE keep-alive (15 s): a silent stream this long is a dead one.
SSE_READ_TIMEOUT_S = 45.0

Stream = Callable[..., AbstractContextManager[httpx.Response]]


@dataclass(frozen=True)
class Target:
    """What to follow: its event stream, how to read it once, when it has ended, and the
    exception a passed deadline raises (given the timeout and the last state seen)."""

    events_path: str
    get: Callable[[], dict[str, Any]]
    finished: frozenset[str]
    timed_out: Callable[[float, dict[str, Any] | None], Exception]


def follow(
    stream: Stream,
    target: Target,
    *,
    connect_timeout: float,
    timeout: float | None,
    poll_interval: float,
) -> Iterator[JobEvent]:
    """The target's events until it ends, the last one `done`; raises target.timed_out once
    `timeout` seconds have passed without the end."""
    deadline = None if timeout is None else time.monotonic() + timeout
    clock = _Deadline(target, deadline, timeout)
    last: dict[str, Any] | None = None
    try:
        reconnect = True
        while reconnect:  # a stream past the server's lifetime ends with `reconnect`
            reconnect = False
            for event in _sse(stream, target, clock, connect_timeout):
                if event.event == "reconnect":
                    reconnect = True
                    break
                if event.event == "status" and _same_status(last, event.data):
                    continue  # a new stream's first event: nothing changed
                if event.event in ("status", "done"):
                    last = event.data
                yield event
                if event.event == "done":
                    return
    except ApiError as exc:
        if exc.status in (401, 403):
            raise
    except (httpx.TransportError, json.JSONDecodeError):
        pass  # a proxy that buffers or cuts streams, a restart: polling still works
    yield from _poll(target, clock, poll_interval, last)


class _Deadline:
    def __init__(self, target: Target, deadline: float | None, timeout: float | None) -> None:
        self.target, self.deadline, self.timeout = target, deadline, timeout

    def check(self, last: dict[str, Any] | None = None) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise self.target.timed_out(self.timeout or 0.0, last)

    def left(self, cap: float) -> float:
        return cap if self.deadline is None else min(cap, self.deadline - time.monotonic())


def _sse(
    stream: Stream, target: Target, clock: _Deadline, connect_timeout: float
) -> Iterator[JobEvent]:
    limits = httpx.Timeout(connect_timeout, read=max(0.05, clock.left(SSE_READ_TIMEOUT_S)))
    headers = {"Accept": "text/event-stream"}
    try:
        with stream("GET", target.events_path, headers=headers, timeout=limits) as response:
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                return
            source = EventSource(_Checked(response, clock.check))  # type: ignore[arg-type]
            for message in source.iter_sse():
                clock.check()
                yield JobEvent(message.event, json.loads(message.data))
    except httpx.ReadTimeout:
        clock.check()
        raise


def _poll(
    target: Target, clock: _Deadline, interval: float, last: dict[str, Any] | None
) -> Iterator[JobEvent]:
    status = last.get("status") if last else None
    progress = last.get("progress") if last else None
    while True:
        item = target.get()
        if item.get("progress") != progress:
            progress = item.get("progress")
            if progress is not None:  # a dataset's progress is null once it has ended
                yield JobEvent("progress", {"id": item.get("id"), **progress})
        if item.get("status") != status:
            status = item.get("status")
            yield JobEvent("status", item)
        if status in target.finished:
            yield JobEvent("done", item)
            return
        clock.check(item)
        time.sleep(max(0.0, clock.left(interval)))
        clock.check(item)


class _Checked:
    """The parts of a streamed response that httpx-sse's EventSource reads (headers, text
    chunks), calling `check` before each chunk: the server's keep-alive pings arrive as chunks
    but are no events, and a deadline must still be noticed while only pings come (a job
    waiting in the queue, a dataset waiting for an ingest worker)."""

    def __init__(self, response: httpx.Response, check: Callable[[], None]) -> None:
        self.headers = response.headers
        self._response, self._check = response, check

    def iter_text(self) -> Iterator[str]:
        for chunk in self._response.iter_text():
            self._check()
            yield chunk


def _same_status(last: dict[str, Any] | None, item: dict[str, Any]) -> bool:
    return last is not None and last.get("status") == item.get("status")
