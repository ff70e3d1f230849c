"""Predict every file of a dataset with one model, shard by shard, into one CSV or JSONL file.

  claim (service.batch_prediction_runs) -> the model as the gateway serves it (same runtime,
  int8 choice, batch size) and the dataset's index -> the files sorted by path, cut into
  shards of `batch_shard_size` -> per shard not yet done: decode and predict, write
  shards/shard-NNNNN/rows.<format> atomically, publish it, record the counts (fenced) ->
  predictions.<format> (the shards in order, under one header) -> published alone -> succeeded

A shard whose rows file exists (here, or published in the object store) is done: a worker
that takes over after a crash skips it, so a finished shard is never computed twice and every
file appears exactly once in the output. The counts in the row follow the shards; a heartbeat
thread beats in between. A cancel is seen after each shard (the answer of `record_shards`):
the batch prediction ends `cancelled` and its files go. Files are decoded as a predict request
decodes them (`Predictor.preprocess`, as bitcore.evaluation does); one that cannot be read or
decoded gets a row with its `error` instead of labels, never dropped. An unexpected error
leaves the claim: the reconciler gives the batch prediction back to the queue once the
heartbeat is stale, and fails it after job_max_attempts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlalchemy.orm import Session

from bitcore.atomic import atomic_write
from bitcore.data.index import DatasetIndex, Sample, decode_workers
from bitcore.images import ImageError
from bitcore.predict import Predictor, top_k_labels
from service import batch_prediction_runs as runs
from service.batch_predictions import KIND, output_name
from service.db import Database
from service.settings import Settings
from service.storage import Storage
from service.tables import BatchPrediction, Dataset, Model
from worker.held_work import WorkFailure, beating, dataset_index, served_predictor
from worker.identity import new_worker_id

log = logging.getLogger(__name__)

SHARDS = "shards"
# The reason written for a file that could not be read at all (bitcore.images names the
# others: empty, undecodable, too_many_pixels, ...).
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Row:
    """One file's answer: its labels and scores, highest first, or why it has none."""

    file: str  # the path inside the dataset (posix)
    labels: list[tuple[str, float]]
    error: str | None = None


@dataclass(frozen=True)
class Batch:
    id: str
    model_id: str
    dataset_id: str
    top_k: int
    format: str
    num_classes: int


def run_batch_prediction(batch_id: str, settings: Settings) -> str:
    """Run `batch_id` to succeeded, failed or cancelled; returns how it ended (for the log)."""
    db = Database(settings.database_url)
    storage = Storage.from_settings(settings)
    worker_id = new_worker_id()
    try:
        with db.sessionmaker() as session:
            claimed = runs.claim(session, batch_id, worker_id, settings)
            if claimed != "claimed":
                if claimed == "too_many_attempts":  # failed by the claim: nothing reads them
                    storage.discard(KIND, batch_id)
                log.info("batch prediction %s not run here: %s", batch_id, claimed)
                return claimed
            row = session.get(BatchPrediction, batch_id)
            assert row is not None
            model = session.get(Model, row.model_id)
            dataset = session.get(Dataset, row.dataset_id) if row.dataset_id else None
            ready = dataset is not None and dataset.status == "ready"
            batch = Batch(
                row.id,
                model.id if model is not None else "",
                dataset.id if dataset is not None and ready else "",
                row.top_k,
                row.format,
                len(model.classes) if model is not None else 0,
            )
        try:
            if not batch.model_id:
                raise WorkFailure("model_missing", "the model was deleted")
            if not batch.dataset_id:
                raise WorkFailure("dataset_missing", "the dataset was deleted or is not ready")
            return _run(db, storage, settings, batch, worker_id)
        except WorkFailure as exc:
            return _fail(db, storage, batch_id, worker_id, exc.code, exc.message)
    finally:
        db.dispose()


def _run(db: Database, storage: Storage, settings: Settings, batch: Batch, worker_id: str) -> str:
    started = time.monotonic()
    lost = threading.Event()
    index = dataset_index(storage, batch.dataset_id)
    samples = sorted(index.samples, key=lambda sample: sample.path)
    size = int(settings.batch_shard_size)
    shards = [samples[i : i + size] for i in range(0, len(samples), size)]
    output = storage.shared_dir(KIND, batch.id) / output_name(batch.format)
    k = max(1, min(batch.top_k, batch.num_classes))

    def beat(session: Session) -> bool:
        return runs.heartbeat(session, batch.id, worker_id)

    with beating(db, settings, f"batch prediction {batch.id}", beat, lost):
        if _output_ready(storage, batch.id, output):
            # A previous attempt wrote it, then died: count every shard (a cancel asked for
            # meanwhile comes too late, as after the last shard).
            if _record(db, batch.id, worker_id, shards, [True] * len(shards)) == "lost":
                return _lost(batch.id)
        else:
            done = [_shard_done(storage, batch, i) for i in range(len(shards))]
            if any(done):
                log.info(
                    "batch prediction %s: %d of %d shards were done already, skipped",
                    batch.id,
                    sum(done),
                    len(shards),
                )
            # Recorded at the start too: the shards a previous worker published.
            state = _record(db, batch.id, worker_id, shards, done)
            predictor: Predictor | None = None
            for i, shard in enumerate(shards):
                if state != "ok":
                    break
                if done[i]:
                    continue
                if lost.is_set():
                    return _lost(batch.id)
                predictor = predictor or served_predictor(storage, settings, batch.model_id)
                rows = predict_files(predictor, index, shard, k)
                _write_shard(storage, batch, i, rows, k)
                done[i] = True
                log.info(
                    "batch prediction %s: shard %d of %d written (%d files)",
                    batch.id,
                    i,
                    len(shards),
                    len(rows),
                )
                state = _record(db, batch.id, worker_id, shards, done)
            if state == "lost":
                return _lost(batch.id)
            if state == "cancel":
                return _cancel(db, storage, batch.id, worker_id)
            _concatenate(storage, batch, len(shards), output, k)
        result = _publish_output(storage, batch.id, output)
    with db.sessionmaker() as session:
        ended = runs.finish_succeeded(session, batch.id, worker_id, result)
    if not ended:
        return _lost(batch.id)
    log.info(
        "batch prediction %s succeeded: model %s on dataset %s, %d files (%d errors), %.1f s",
        batch.id,
        batch.model_id,
        batch.dataset_id,
        result["rows"],
        result["errors"],
        time.monotonic() - started,
    )
    return "succeeded"


def _record(
    db: Database, batch_id: str, worker_id: str, shards: list[list[Sample]], done: list[bool]
) -> str:
    """Store the counts of the shards done: "ok", "cancel" or "lost" (runs.record_shards)."""
    with db.sessionmaker() as session:
        return runs.record_shards(
            session,
            batch_id,
            worker_id,
            shards_done=sum(done),
            shards_total=len(shards),
            images_done=sum(len(s) for s, d in zip(shards, done, strict=True) if d),
            images_total=sum(len(s) for s in shards),
        )


def predict_files(
    predictor: Predictor, index: DatasetIndex, samples: Sequence[Sample], k: int
) -> list[Row]:
    """Each sample's top-k labels, in the order given; a file that cannot be read or decoded
    gets its reason instead."""

    def decode(sample: Sample) -> torch.Tensor | str:
        try:
            data = index.path_of(sample).read_bytes()
        except OSError:
            return UNREADABLE
        try:  # the predict request's own decoding (as bitcore.evaluation scores images)
            return predictor.preprocess([data])[0]
        except ImageError as exc:
            return exc.reason

    # preprocess is thread-safe and Pillow releases the GIL while decoding.
    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        decoded = list(pool.map(decode, samples))
    tensors = [item for item in decoded if isinstance(item, torch.Tensor)]
    ranked = iter(
        top_k_labels(predictor.predict_tensor(torch.stack(tensors)), predictor.classes, k)
        if tensors
        else []
    )
    return [
        Row(sample.path, next(ranked))
        if isinstance(item, torch.Tensor)
        else Row(sample.path, [], item)
        for sample, item in zip(samples, decoded, strict=True)
    ]


def header(format: str, k: int) -> bytes:
    """The CSV header (`file,label_1,score_1,...,label_k,score_k,error`); JSONL has none."""
    if format != "csv":
        return b""
    names = ["file"]
    for rank in range(1, k + 1):
        names += [f"label_{rank}", f"score_{rank}"]
    return _csv_line([*names, "error"])


def render(rows: Sequence[Row], format: str, k: int) -> bytes:
    """Rows as CSV lines (no header) or JSON lines: {"file", "predictions": [{label, score}]},
    plus "error" for a file without predictions (its predictions then empty)."""
    out = io.BytesIO()
    for row in rows:
        if format == "csv":
            cells: list[str] = [row.file]
            for rank in range(k):
                if rank < len(row.labels):
                    cells += [row.labels[rank][0], repr(row.labels[rank][1])]
                else:
                    cells += ["", ""]
            out.write(_csv_line([*cells, row.error or ""]))
        else:
            line: dict[str, object] = {
                "file": row.file,
                "predictions": [{"label": label, "score": score} for label, score in row.labels],
            }
            if row.error is not None:
                line["error"] = row.error
            out.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
    return out.getvalue()


def _csv_line(cells: Sequence[str]) -> bytes:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerow(cells)
    return text.getvalue().encode()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _rows_name(format: str) -> str:
    return f"rows.{format}"


def _shard_dir(storage: Storage, batch_id: str, index: int) -> Path:
    return storage.shared_dir(KIND, batch_id) / SHARDS / shard_name(index)


def _shard_key(batch_id: str, index: int) -> str:
    return f"{KIND}/{batch_id}/{SHARDS}/{shard_name(index)}"


def _shard_done(storage: Storage, batch: Batch, index: int) -> bool:
    """The shard's rows file is here (published too, then) or in the object store (fetched)."""
    folder = _shard_dir(storage, batch.id, index)
    key = _shard_key(batch.id, index)
    if (folder / _rows_name(batch.format)).is_file():
        if storage.remote and not storage.objects.exists(key):
            storage.objects.publish(key, folder)  # written, then the worker died: publish now
        return True
    if storage.remote and storage.objects.exists(key):
        storage.remove(folder)
        storage.objects.fetch(key, folder)
        return True
    return False


def _write_shard(storage: Storage, batch: Batch, index: int, rows: Sequence[Row], k: int) -> None:
    folder = _shard_dir(storage, batch.id, index)
    storage.remove(folder)  # a temporary file of a write that a crash interrupted
    folder.mkdir(parents=True)
    with atomic_write(folder / _rows_name(batch.format)) as tmp:
        tmp.write_bytes(render(rows, batch.format, k))
    storage.objects.publish(_shard_key(batch.id, index), folder)


def _concatenate(storage: Storage, batch: Batch, shards: int, output: Path, k: int) -> None:
    """The output: the header, then every shard's rows in shard order (files sorted by path)."""
    with atomic_write(output) as tmp, tmp.open("wb") as out:
        out.write(header(batch.format, k))
        for index in range(shards):
            path = _shard_dir(storage, batch.id, index) / _rows_name(batch.format)
            with path.open("rb") as rows:
                while chunk := rows.read(1 << 20):
                    out.write(chunk)


def _publish_output(storage: Storage, batch_id: str, output: Path) -> dict[str, int | str]:
    """The output alone becomes the published folder: shards go, here and in the store.
    Returns the result: {rows, errors, bytes, sha256} of the output file."""
    storage.remove(output.parent / SHARDS)
    storage.publish(KIND, batch_id)
    if storage.remote:
        storage.objects.prune(f"{KIND}/{batch_id}", {output.name})
    digest, size = hashlib.sha256(), 0
    with output.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    rows, errors = count_rows(output)
    return {"rows": rows, "errors": errors, "bytes": size, "sha256": digest.hexdigest()}


def count_rows(output: Path) -> tuple[int, int]:
    """(rows, rows with an error) of an output file, parsed (a CSV cell may hold a newline)."""
    rows = errors = 0
    with output.open(encoding="utf-8", newline="") as text:
        if output.suffix == ".csv":
            records = csv.reader(text)
            next(records, None)  # the header
            for cells in records:
                rows += 1
                errors += bool(cells[-1])
        else:
            for line in text:
                rows += 1
                errors += "error" in json.loads(line)
    return rows, errors


def _output_ready(storage: Storage, batch_id: str, output: Path) -> bool:
    """A previous attempt wrote the output (then died before recording it)."""
    if output.is_file():
        return True
    if storage.remote and storage.objects.exists(f"{KIND}/{batch_id}"):
        storage.remove(output.parent)
        storage.ensure_local(KIND, batch_id)
        return output.is_file()
    return False


def _cancel(db: Database, storage: Storage, batch_id: str, worker_id: str) -> str:
    with db.sessionmaker() as session:
        ended = runs.finish_cancelled(session, batch_id, worker_id)
    if not ended:
        return _lost(batch_id)
    storage.discard(KIND, batch_id)
    log.info("batch prediction %s cancelled", batch_id)
    return "cancelled"


def _fail(
    db: Database, storage: Storage, batch_id: str, worker_id: str, code: str, message: str
) -> str:
    with db.sessionmaker() as session:
        ended = runs.finish_failed(session, batch_id, worker_id, code, message)
    log.info("batch prediction %s failed: %s: %s", batch_id, code, message)
    if not ended:
        return "lost"
    storage.discard(KIND, batch_id)
    return "failed"


def _lost(batch_id: str) -> str:
    # Its files are left alone: another worker may be using them now.
    log.warning("batch prediction %s is no longer this worker's; stopped", batch_id)
    return "lost"
