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
  CPU-bound runs on the event loop, and decoding never takes a forward thread.
- Threads sized to the CPUs the process really has (bitcore.cpus: affinity, cgroup quota,
  `BITSERVE_CPUS`), set when the cache starts (the app's start-up), not at import: torch's
  intra-op threads and ONNX Runtime's = that figure, torch's inter-op threads = 1, the decode
  pool min(8, it). A 2-CPU container on a 64-core host would otherwise run 64 threads per
  forward and be throttled by its quota.
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
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bitcore.artifacts import METADATA_FILE, WEIGHTS_FILE, ArtifactError, ArtifactMissing
from bitcore.cpus import cpu_budget, set_torch_threads
from bitcore.export import ONNX_FILE
from bitcore.predict import Prediction, Predictor, top_k_labels
from bitcore.quantize import INT8_FILE
from bitcore.runtimes import RuntimeMismatch
from service.batching import Batcher, Overloaded
from service.object_store import ObjectCorrupt, ObjectMissing, ObjectStoreError

if TYPE_CHECKING:
    from service.settings import Settings
    from service.storage import Storage

log = logging.getLogger(__name__)
ARTIFACT_FILES = (WEIGHTS_FILE, METADATA_FILE)
# A refused export (RuntimeMismatch) is tried again once any of these files changes.
SIGNATURE_FILES = (*ARTIFACT_FILES, ONNX_FILE, INT8_FILE)


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
        self.cpu_budget = cpu_budget(override=settings.cpus)
        cpus = self.cpu_budget.cpus
        # One loader: loads are rare and big; doing them one at a time bounds the memory peak.
        self._load_pool: ThreadPoolExecutor | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self._compute_pool: ThreadPoolExecutor | None = None
        # Decoding is I/O and memory bound past a few threads; Pillow releases the GIL.
        self.decode_workers = min(8, cpus)
        # Intra-op threads of one forward (torch and ONNX Runtime): every CPU there is.
        self.compute_threads = cpus
        # Torch already spreads one forward over all cores (intra-op threads); two forwards at
        # once (two models) is enough to keep a GPU busy while the CPU prepares the next.
        self._compute_workers = 2

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._decode_pool is not None:
            return
        # Here and not at import: only a process that serves predictions sizes torch's pools
        # (process-wide), before its forward threads exist.
        set_torch_threads(self.compute_threads)
        log.info(
            "predict threads: %d compute, %d decode (cpus: %s)",
            self.compute_threads,
            self.decode_workers,
            self.cpu_budget.describe(),
        )
        if self.metrics is not None:
            self.metrics.available_cpus.set(self.cpu_budget.cpus)
            self.metrics.predict_threads.labels("compute").set(self.compute_threads)
            self.metrics.predict_threads.labels("decode").set(self.decode_workers)
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="bitserve-load")
        self._decode_pool = ThreadPoolExecutor(
            self.decode_workers, thread_name_prefix="bitserve-decode"
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
                int8=bool(self.settings.predict_int8),
                threads=self.compute_threads,
                jpeg_draft=bool(self.settings.predict_jpeg_draft),
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
            "loaded model %s (%s, %d classes, %s, %s) in %.2f s, warm-up %.3f s",
            model_id,
            predictor.model_name,
            predictor.num_classes,
            predictor.runtime,
            predictor.precision,
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


__all__ = ["ModelCache", "ModelUnavailable", "Overloaded"]
