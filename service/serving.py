"""Serving fine-tuned models: a per-process LRU of loaded predictors and dynamic batching.

What the best servers do (docs/operations.md "Serving") and how it is done here:
- Load once, off the request path: a model is loaded in a worker thread the first time it is
  asked for; concurrent requests for the same model wait on that one load; a warm-up forward
  runs before the model is used (allocator, kernel selection, lazy init).
- An LRU of at most `settings.model_cache_size` loaded models. Memory is bounded by
  count x model size (an R50x1 is ~95 MB of float32 weights, an R152x4 ~3.7 GB): size the
  cache for the largest models you serve. An evicted model finishes the batches it already
  holds; it is loaded again on its next request.
- Decoding and resizing run in a thread pool, and the forward pass in another: nothing
  CPU-bound runs on the event loop.
- Dynamic batching per model (Triton-style): concurrent requests' images are coalesced into
  one forward of at most `predict_max_batch_size` images. Images that arrive while a forward
  runs wait for it and go together into the next; `predict_max_queue_delay_ms` can also hold
  an idle model's first request back for company. Its default is 0, so at low traffic a
  request never waits (Triton's default; TorchServe's 100 ms is a known complaint): measured
  in benchmarks/RESULTS.md, 2 ms gained nothing under load and cost 15% at one in flight.
  A request with several images counts as several items and is split across batches when it
  does not fit. Batching is exact here: GroupNorm uses per-image statistics (BiT sec. 4.3
  chose it over BatchNorm), so an image gets the same scores alone or in a batch.
- A bounded queue: at most `predict_max_queue` admitted, unfinished images per process;
  past it, `Overloaded` (the API answers 503 + Retry-After) instead of unbounded latency.
- Metrics separate queue time from compute time, plus a batch-size histogram.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from bitcore.artifacts import METADATA_FILE, WEIGHTS_FILE, ArtifactError, ArtifactMissing
from bitcore.export import ONNX_FILE
from bitcore.predict import Prediction, Predictor, top_k_labels
from bitcore.runtimes import RuntimeMismatch
from service.object_store import ObjectCorrupt, ObjectMissing, ObjectStoreError

if TYPE_CHECKING:
    from service.settings import Settings
    from service.storage import Storage

log = logging.getLogger(__name__)
ARTIFACT_FILES = (WEIGHTS_FILE, METADATA_FILE)
# A refused export (RuntimeMismatch) is tried again once any of these files changes.
SIGNATURE_FILES = (*ARTIFACT_FILES, ONNX_FILE)


class Overloaded(Exception):
    """Too many images are waiting; the caller should retry after `retry_after` seconds."""

    def __init__(self, waiting: int, limit: int, retry_after: int = 1) -> None:
        super().__init__(
            f"{waiting} images are already waiting (limit {limit}); retry in {retry_after} s"
        )
        self.waiting = waiting
        self.limit = limit
        self.retry_after = retry_after


class ModelUnavailable(Exception):
    """The model's artifact could not be loaded: `code` says why (docs/api.md):
    model_artifact_corrupt (damaged on disk) or model_unavailable (missing, unreadable)."""

    def __init__(self, code: str, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


# A damaged file stays damaged until someone restores or re-publishes it: clients need not
# retry soon. A missing or unreadable one may be a store that is still being mounted.
CORRUPT_RETRY_AFTER_S = 60
UNAVAILABLE_RETRY_AFTER_S = 5


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

    Runs on the event loop; the forward pass itself goes to `executor`. The batching task is
    started by the first submission and ends when the queue is empty, so an idle or evicted
    model holds no task.
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
            batch = torch.cat([r.inputs[start:stop] for r, start, stop in pieces])
            started = time.perf_counter()
            for request, _, _ in pieces:
                if request.started is None:
                    request.started = started
                    self._observe("predict_queue_seconds", started - request.enqueued)
            self._observe("predict_batch_size", int(batch.shape[0]))
            self.computing = int(batch.shape[0])
            try:
                probs = await loop.run_in_executor(
                    self.executor, self.predictor.predict_tensor, batch
                )
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


@dataclass
class _Entry:
    predictor: Predictor
    batcher: Batcher


class ModelCache:
    """Loaded models by id (LRU, at most `settings.model_cache_size`), each with its batcher."""

    def __init__(self, settings: Settings, storage: Storage, metrics: Any = None) -> None:
        self.settings = settings
        self.storage = storage
        self.metrics = metrics
        self.capacity = max(1, int(settings.model_cache_size))
        self.max_queue = int(settings.predict_max_queue)
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._loading: dict[str, asyncio.Task[_Entry]] = {}
        self._discard: set[str] = set()
        # Models whose artifact failed to load, with the files' stat signature at that time:
        # answered from here (no reload, no second log line) until the files change.
        self._broken: dict[
            str, tuple[tuple[tuple[int, int, int] | None, ...], ModelUnavailable]
        ] = {}
        self._waiting = 0  # admitted images not yet answered, all models together
        cpus = os.cpu_count() or 1
        # One loader: loads are rare and big; doing them one at a time bounds the memory peak.
        self._load_pool: ThreadPoolExecutor | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self._compute_pool: ThreadPoolExecutor | None = None
        self._decode_workers = min(8, cpus)
        # Torch already spreads one forward over all cores (intra-op threads); two forwards at
        # once (two models) is enough to keep a GPU busy while the CPU prepares the next.
        self._compute_workers = 2

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._decode_pool is not None:
            return
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="bitserve-load")
        self._decode_pool = ThreadPoolExecutor(
            self._decode_workers, thread_name_prefix="bitserve-decode"
        )
        self._compute_pool = ThreadPoolExecutor(
            self._compute_workers, thread_name_prefix="bitserve-forward"
        )

    async def close(self) -> None:
        for entry in list(self._entries.values()):
            await entry.batcher.close()
        self._entries.clear()
        for future in self._loading.values():
            future.cancel()
        self._loading.clear()
        for pool in (self._load_pool, self._decode_pool, self._compute_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._load_pool = self._decode_pool = self._compute_pool = None

    # -- the cache -------------------------------------------------------------------------

    @property
    def loaded(self) -> list[str]:
        """Ids of loaded models, least recently used first."""
        return list(self._entries)

    @property
    def waiting(self) -> int:
        return self._waiting

    def peek(self, model_id: str) -> Predictor | None:
        """The loaded predictor, if any, without loading it or touching the LRU order."""
        entry = self._entries.get(model_id)
        return entry.predictor if entry is not None else None

    def queued(self, model_id: str) -> tuple[int, int]:
        """(images waiting in the model's batch queue, images in its running forward pass)."""
        entry = self._entries.get(model_id)
        if entry is None:
            return 0, 0
        return entry.batcher.queued_items, entry.batcher.computing

    async def get(self, model_id: str) -> Predictor:
        """The model's predictor, loading (and warming up) it first if needed."""
        return (await self._entry(model_id)).predictor

    def evict(self, model_id: str) -> bool:
        """Forget a loaded model (e.g. it was deleted). In-flight batches still finish."""
        self._broken.pop(model_id, None)
        if model_id in self._loading:
            self._discard.add(model_id)
        return self._entries.pop(model_id, None) is not None

    async def _entry(self, model_id: str) -> _Entry:
        entry = self._entries.get(model_id)
        if entry is not None:
            self._entries.move_to_end(model_id)
            return entry
        task = self._loading.get(model_id)
        if task is None:
            self._raise_if_still_broken(model_id)
            # The load is its own task, not part of any one request: a client that goes away
            # does not cancel the load others wait on (hence the shield below).
            task = asyncio.get_running_loop().create_task(self._load_and_insert(model_id))
            task.add_done_callback(_retrieve_exception)
            self._loading[model_id] = task
        return await asyncio.shield(task)

    def _raise_if_still_broken(self, model_id: str) -> None:
        broken = self._broken.get(model_id)
        if broken is None:
            return
        signature, error = broken
        if self._signature(model_id) != signature:  # restored or replaced: try it again
            del self._broken[model_id]
            return
        raise ModelUnavailable(error.code, str(error), error.retry_after)

    def _signature(self, model_id: str) -> tuple[tuple[int, int, int] | None, ...]:
        """(size, mtime, inode) of each artifact file: changes when a file is replaced."""
        directory = self.storage.model_dir(model_id)
        signature: list[tuple[int, int, int] | None] = []
        for name in SIGNATURE_FILES:
            try:
                stat = (directory / name).stat()
            except OSError:
                signature.append(None)
            else:
                signature.append((stat.st_size, stat.st_mtime_ns, stat.st_ino))
        return tuple(signature)

    async def _load_and_insert(self, model_id: str) -> _Entry:
        loop = asyncio.get_running_loop()
        signature = self._signature(model_id)
        try:
            entry = await loop.run_in_executor(self._pools()[0], self._load, model_id)
        except ModelUnavailable as exc:
            # Logged here, once per damaged file, with the path (clients get no server paths).
            log.error("%s (%s)", exc, exc.__cause__)
            if type(exc.__cause__) is ObjectStoreError:
                raise  # the object store did not answer: the next request fetches again
            # A fresh copy: `exc`'s traceback would keep the half-loaded model's tensors alive.
            self._broken[model_id] = (
                signature,
                ModelUnavailable(exc.code, str(exc), exc.retry_after),
            )
            raise
        finally:
            self._loading.pop(model_id, None)
        self._broken.pop(model_id, None)
        if model_id in self._discard:  # deleted while it was loading
            self._discard.discard(model_id)
        else:
            self._insert(model_id, entry)
        return entry

    def _load(self, model_id: str) -> _Entry:
        """In the loader thread: fetch the artifact on a cache miss, read it, fold WS, warm
        up."""
        started = time.perf_counter()
        try:
            predictor = Predictor.load(
                self.storage.ensure_local("models", model_id),
                self.settings.device,
                max_batch_size=int(self.settings.predict_max_batch_size),
                # Lower than for datasets: a predict image is decoded on the request path.
                max_pixels=int(self.settings.predict_max_image_pixels),
                runtime=self.settings.predict_runtime,
            )
            warmup = predictor.warmup()
        except (ArtifactMissing, ObjectMissing) as exc:
            raise ModelUnavailable(
                "model_unavailable",
                f"model {model_id} cannot be served: a file of its artifact is missing on the "
                "server",
                UNAVAILABLE_RETRY_AFTER_S,
            ) from exc
        except (ArtifactError, ObjectCorrupt) as exc:  # on disk, or in the object store
            raise ModelUnavailable(
                "model_artifact_corrupt",
                f"model {model_id} cannot be served: its artifact on the server is damaged "
                "(other models are not affected); restore the file, or train it again",
                CORRUPT_RETRY_AFTER_S,
            ) from exc
        except RuntimeMismatch as exc:  # the runtime's answers are not eager's: never serve them
            raise ModelUnavailable(
                "model_unavailable",
                f"model {model_id} cannot be served: {exc}",
                CORRUPT_RETRY_AFTER_S,
            ) from exc
        except Exception as exc:  # unreadable file, an error in the warm-up: never a 500
            raise ModelUnavailable(
                "model_unavailable",
                f"model {model_id} cannot be loaded: {type(exc).__name__}",
                UNAVAILABLE_RETRY_AFTER_S,
            ) from exc
        log.info(
            "loaded model %s (%s, %d classes, %s) in %.2f s, warm-up %.3f s",
            model_id,
            predictor.model_name,
            predictor.num_classes,
            predictor.runtime,
            time.perf_counter() - started,
            warmup,
        )
        batcher = Batcher(
            predictor,
            self._pools()[2],
            max_batch_size=int(self.settings.predict_max_batch_size),
            max_delay_s=float(self.settings.predict_max_queue_delay_ms) / 1000.0,
            metrics=self.metrics,
        )
        return _Entry(predictor, batcher)

    def _insert(self, model_id: str, entry: _Entry) -> None:
        self._entries[model_id] = entry
        self._entries.move_to_end(model_id)
        while len(self._entries) > self.capacity:
            evicted, _ = self._entries.popitem(last=False)
            log.info("evicted model %s from the cache (capacity %d)", evicted, self.capacity)

    def _pools(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor, ThreadPoolExecutor]:
        if self._load_pool is None or self._decode_pool is None or self._compute_pool is None:
            self.start()
        assert self._load_pool and self._decode_pool and self._compute_pool
        return self._load_pool, self._decode_pool, self._compute_pool

    # -- prediction ------------------------------------------------------------------------

    async def predict(self, model_id: str, images: Sequence[bytes], top_k: int) -> list[Prediction]:
        """Per image, its top_k (label, probability) pairs, most probable first.

        Raises Overloaded past the queue bound, ModelUnavailable when the artifact cannot be
        loaded, and bitcore.predict.InputImageError (with `.index`) for an unusable image.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        count = len(images)
        if self._waiting + count > self.max_queue:
            raise Overloaded(self._waiting, self.max_queue)
        self._set_waiting(self._waiting + count)
        try:
            entry = await self._entry(model_id)
            loop = asyncio.get_running_loop()
            inputs = await loop.run_in_executor(
                self._pools()[1], entry.predictor.preprocess, list(images)
            )
            probs = await entry.batcher.submit(inputs)
        finally:
            self._set_waiting(self._waiting - count)
        counter = getattr(self.metrics, "predict_images", None)
        if counter is not None:
            counter.inc(count)
        return top_k_labels(probs, entry.predictor.classes, top_k)

    def _set_waiting(self, value: int) -> None:
        self._waiting = value
        gauge = getattr(self.metrics, "predict_queue_depth", None)
        if gauge is not None:
            gauge.set(value)


def _retrieve_exception(task: asyncio.Task[_Entry]) -> None:
    # Every waiter may have gone away; the error was logged by whoever saw it, if anyone.
    if not task.cancelled():
        task.exception()
