"""Dynamic batching for one model (Triton-style), used by service.serving's ModelCache.

Concurrent requests' images are coalesced into one forward of at most `predict_max_batch_size`
images. Images that arrive while a forward runs wait for it and go together into the next;
`predict_max_queue_delay_ms` can also hold an idle model's first request back for company (0
by default: at low traffic a request never waits). A request with several images counts as
several items and is split across batches when it does not fit. Batching is exact: GroupNorm
uses per-image statistics, so an image gets the same scores alone or in a batch. At most
`predict_max_queue` admitted, unfinished images per process; past it, `Overloaded` (503 +
Retry-After) instead of unbounded latency.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from bitcore.predict import Predictor

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """Too many images are waiting; the caller should retry after `retry_after` seconds."""

    def __init__(self, waiting: int, limit: int, retry_after: int = 1) -> None:
        super().__init__(
            f"{waiting} images are already waiting (limit {limit}); retry in {retry_after} s"
        )
        self.waiting = waiting
        self.limit = limit
        self.retry_after = retry_after


@dataclass
class _Request:
    """One request's images waiting in a model's batcher; results fill `probs` row by row."""

    inputs: torch.Tensor  # (N, 3, crop, crop)
    future: asyncio.Future[torch.Tensor]
    enqueued: float  # time.perf_counter() when it entered the queue
    taken: int = 0  # rows already handed to a batch
    done: int = 0  # rows whose scores have come back
    probs: torch.Tensor | None = None
    started: float | None = field(default=None)  # when its first rows left the queue

    @property
    def remaining(self) -> int:
        return int(self.inputs.shape[0]) - self.taken


class Batcher:
    """Coalesce concurrent requests for one model into forwards of at most `max_batch_size`.

    Runs on the event loop; joining the batch and the forward pass go to `executor`. The
    batching task is started by the first submission and ends when the queue is empty, so an
    idle or evicted model holds no task.
    """

    def __init__(
        self,
        predictor: Predictor,
        executor: ThreadPoolExecutor,
        *,
        max_batch_size: int,
        max_delay_s: float,
        metrics: Any = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.predictor = predictor
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_delay_s = max(0.0, max_delay_s)
        self.metrics = metrics
        self._queue: collections.deque[_Request] = collections.deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.computing = 0  # images in the forward pass running now

    @property
    def queued_items(self) -> int:
        return sum(r.remaining for r in self._queue)

    async def submit(self, inputs: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (N, num_classes) for a preprocessed (N, 3, H, W) batch."""
        loop = asyncio.get_running_loop()
        if inputs.shape[0] == 0:
            return torch.empty((0, self.predictor.num_classes))
        request = _Request(inputs, loop.create_future(), time.perf_counter())
        self._queue.append(request)
        self._arrived.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="bitserve-batcher")
        return await request.future

    async def close(self) -> None:
        """Stop the batching task; requests still queued are cancelled."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            self._queue.popleft().future.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_abandoned()
            if not self._queue:
                return
            await self._wait_for_company()
            pieces = self._take_batch()
            if not pieces:
                continue
            size = sum(stop - start for _, start, stop in pieces)
            started = time.perf_counter()
            for request, _, _ in pieces:
                if request.started is None:
                    request.started = started
                    self._observe("predict_queue_seconds", started - request.enqueued)
            self._observe("predict_batch_size", size)
            self.computing = size
            try:
                probs = await loop.run_in_executor(self.executor, self._forward, pieces)
            except Exception as exc:  # a failed forward fails every request in it
                log.exception("forward pass failed for %s", self.predictor.model_name)
                for request, _, _ in pieces:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            finally:
                self.computing = 0
            self._observe("predict_compute_seconds", time.perf_counter() - started)
            self._deliver(pieces, probs)

    def _forward(self, pieces: list[tuple[_Request, int, int]]) -> torch.Tensor:
        """In a forward thread: join the pieces into one batch and run it. The join copies
        every pixel of the batch (88 MB for 32 images at 480 px): not on the event loop."""
        batch = torch.cat([r.inputs[start:stop] for r, start, stop in pieces])
        return self.predictor.predict_tensor(batch)

    async def _wait_for_company(self) -> None:
        """Wait up to max_delay after the oldest request arrived, unless the batch is full."""
        if self.max_delay_s <= 0:
            return
        deadline = self._queue[0].enqueued + self.max_delay_s
        while self.queued_items < self.max_batch_size:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _take_batch(self) -> list[tuple[_Request, int, int]]:
        """Up to max_batch_size rows from the head of the queue; a request may be split."""
        pieces: list[tuple[_Request, int, int]] = []
        room = self.max_batch_size
        while room > 0 and self._queue:
            request = self._queue[0]
            if request.future.done():  # abandoned (client went away) or already failed
                self._queue.popleft()
                continue
            count = min(room, request.remaining)
            pieces.append((request, request.taken, request.taken + count))
            request.taken += count
            room -= count
            if request.remaining == 0:
                self._queue.popleft()
        return pieces

    def _deliver(self, pieces: list[tuple[_Request, int, int]], probs: torch.Tensor) -> None:
        offset = 0
        for request, start, stop in pieces:
            rows = probs[offset : offset + (stop - start)]
            offset += stop - start
            if request.future.done():
                continue
            if request.probs is None:
                request.probs = torch.empty((int(request.inputs.shape[0]), probs.shape[1]))
            request.probs[start:stop] = rows
            request.done += stop - start
            if request.done == request.inputs.shape[0]:
                request.future.set_result(request.probs)

    def _drop_abandoned(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    def _observe(self, name: str, value: float) -> None:
        metric = getattr(self.metrics, name, None)
        if metric is not None:
            metric.observe(value)
