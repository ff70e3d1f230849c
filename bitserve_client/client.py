"""BitserveClient: the REST API v1 (docs/api.md) from Python, on a synchronous httpx client.

    with BitserveClient("http://127.0.0.1:8000") as api:
        dataset = api.upload_dataset("photos/")            # a folder is zipped on the fly;
                                                           # returns once the dataset is ready
        job = api.create_job(dataset["id"], "BiT-M-R50x1")
        job = api.wait_for_job(job["id"], on_progress=print)
        print(api.predict(job["model_id"], ["cat.jpg"], top_k=3))

Retries (bounded by `max_retries` and `max_retry_wait`, docs/api.md "Retries"): a 429 answer,
and a 503 `shutting_down` or `too_many_uploads` (refused before any work), are retried after
their Retry-After for every call; other 503 answers and lost connections (refused, reset, closed without an answer:
a gateway restarting) only for idempotent calls: GET, DELETE, predict (a pure function) and job
creation (sent with an Idempotency-Key, a fresh one per call unless given, so a retry never
starts a second job). An upload (a POST that creates a dataset) is thus sent again only when
the server did nothing with it, never after a lost answer or another 503. Not retried: the streamed
artifact download, and the event streams of jobs and datasets (they fall back to polling
instead). Every other error answer raises ApiError with the server's code, message and
details; a dataset whose ingestion failed raises DatasetFailed, an ApiError with the code,
message and details the failed dataset carries.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import quote

import httpx

from bitserve_client.errors import (
    ApiError,
    BatchPredictionFailed,
    BatchPredictionTimeout,
    DatasetFailed,
    DatasetTimeout,
    EvaluationFailed,
    EvaluationTimeout,
    JobFailed,
    JobTimeout,
)
from bitserve_client.files import ImageInput, image_part, is_pil, zip_folder
from bitserve_client.follow import Target, follow
from bitserve_client.retries import IDEMPOTENT_METHODS, RetryPolicy
from bitserve_client.schema import (
    AuditEvent,
    BaseModel,
    BatchPrediction,
    Dataset,
    Evaluation,
    IngestProgressEvent,
    Job,
    JobEvent,
    JobMetrics,
    Label,
    Model,
    PlanEstimate,
    ProgressEvent,
    Rejected,
)

FilesFactory = Callable[[ExitStack], list[tuple[str, tuple[str, IO[bytes] | bytes, str]]]]

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
DATASET_ENDED = frozenset({"ready", "failed"})
ARCHIVE_TYPES = {".zip": "application/zip", ".tgz": "application/gzip", ".gz": "application/gzip"}
PAGE_SIZE = 100


class BitserveClient:
    """A bitserve server's API. Thread-safe as httpx.Client is; close() or use `with`.

    `api_key` defaults to $BITSERVE_API_KEY, else the admin key `bitserve up` wrote to
    $BITSERVE_HOME/admin.key (BITSERVE_HOME defaults to ./.bitserve); api_key="" sends none.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 60.0,
        *,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if max_retries < 0 or max_retry_wait < 0:
            raise ValueError("max_retries and max_retry_wait must be >= 0")
        headers = {"User-Agent": "bitserve-client/0.1", "Accept": "application/json"}
        if api_key is None:
            api_key = default_api_key()
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self._retry = RetryPolicy(max_retries, max_retry_wait)
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BitserveClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- datasets ----------------------------------------------------------------------------

    def upload_dataset(
        self,
        path_or_folder: str | os.PathLike[str],
        name: str | None = None,
        *,
        wait: bool = True,
        timeout: float | None = None,
        on_progress: Callable[[IngestProgressEvent], object] | None = None,
        poll_interval: float = 1.0,
    ) -> Dataset:
        """Upload a .zip / .tar.gz of `<class>/<image>` folders, or a folder (zipped first, into
        a temp file that is removed afterwards). The server judges the archive by its content.

        The server answers as soon as the archive is stored (202, status `processing`); an
        ingest worker then extracts and checks every image. By default this waits for that
        (wait_for_dataset: `timeout`, `on_progress`, `poll_interval`) and returns the ready
        dataset, or raises DatasetFailed with the error that refused the archive (e.g.
        `too_few_classes`, `archive_unsafe`). wait=False returns the processing dataset at once.
        """
        path = Path(path_or_folder)
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        data = {"name": name} if name is not None else None
        if path.is_dir():
            with tempfile.TemporaryDirectory(prefix="bitserve-upload-") as tmp:
                archive = zip_folder(path, Path(tmp) / f"{path.name or 'dataset'}.zip")
                dataset = self._upload(archive, data)
        else:
            dataset = self._upload(path, data)
        if not wait or dataset.get("status") != "processing":
            return dataset
        return self.wait_for_dataset(
            dataset["id"], timeout=timeout, on_progress=on_progress, poll_interval=poll_interval
        )

    def _upload(self, archive: Path, data: dict[str, str] | None) -> Dataset:
        suffix = archive.suffix.lower()
        content_type = ARCHIVE_TYPES.get(suffix, "application/octet-stream")

        def files(stack: ExitStack) -> list[tuple[str, tuple[str, IO[bytes] | bytes, str]]]:
            # Opened per attempt: a retried upload starts again from the first byte; httpx
            # streams the file part in chunks, so the archive is never held in memory.
            handle = stack.enter_context(archive.open("rb"))
            return [("file", (archive.name, handle, content_type))]

        # No read timeout: the server stores the whole archive (the object store included)
        # before it answers, which takes a while for a large one.
        wait = httpx.Timeout(self.timeout, read=None)
        response = self._request("POST", "/v1/datasets", files=files, data=data, timeout=wait)
        return cast(Dataset, response.json())

    def get_dataset(self, dataset_id: str) -> Dataset:
        return cast(Dataset, self._get(f"/v1/datasets/{_seg(dataset_id)}"))

    def watch_dataset(
        self, dataset_id: str, *, timeout: float | None = None, poll_interval: float = 1.0
    ) -> Iterator[JobEvent]:
        """A dataset's ingestion events until it is ready or failed, ending with `done` (data:
        the dataset): `status` (data: the Dataset), `progress` (data: an IngestProgressEvent).

        Reads GET /v1/datasets/{id}/events, else polls GET /v1/datasets/{id} (as watch_job).
        Raises DatasetTimeout once `timeout` seconds have passed without the end.
        """

        def timed_out(after: float, last: dict[str, Any] | None) -> Exception:
            return DatasetTimeout(dataset_id, after, last)

        target = Target(
            f"/v1/datasets/{_seg(dataset_id)}/events",
            lambda: dict(self.get_dataset(dataset_id)),
            DATASET_ENDED,
            timed_out,
        )
        return follow(
            self._stream,
            target,
            connect_timeout=self.timeout,
            timeout=timeout,
            poll_interval=poll_interval,
        )

    def wait_for_dataset(
        self,
        dataset_id: str,
        timeout: float | None = None,
        on_progress: Callable[[IngestProgressEvent], object] | None = None,
        *,
        poll_interval: float = 1.0,
    ) -> Dataset:
        """Block until the dataset's ingestion ends; return it if ready, else raise
        DatasetFailed (an ApiError with the dataset's error code, message and details).
        `on_progress` gets each progress update (phase, done, total); a dataset that has
        already ended is returned (or raised) at once."""
        for event in self.watch_dataset(dataset_id, timeout=timeout, poll_interval=poll_interval):
            if event.event == "progress" and on_progress is not None:
                on_progress(cast(IngestProgressEvent, event.data))
            elif event.event == "done":
                dataset = cast(Dataset, event.data)
                if dataset.get("status") != "ready":
                    raise DatasetFailed(dict(dataset))
                return dataset
        raise AssertionError(
            "unreachable: watch_dataset ends with done or raises"
        )  # pragma: no cover

    def list_datasets(self, *, page_size: int = PAGE_SIZE) -> Iterator[Dataset]:
        """Every dataset, newest first, fetching the pages as they are consumed."""
        return cast(Iterator[Dataset], self._pages("/v1/datasets", {}, page_size))

    def rejected_files(self, dataset_id: str, *, page_size: int = PAGE_SIZE) -> Iterator[Rejected]:
        """Every member the upload skipped, with why (a dataset lists only the first 100)."""
        path = f"/v1/datasets/{_seg(dataset_id)}/rejected"
        return cast(Iterator[Rejected], self._pages(path, {}, page_size))

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/v1/datasets/{_seg(dataset_id)}")

    def plan(self, dataset_id: str, base_model: str, **overrides: Any) -> PlanEstimate:
        """The BiT-HyperRule plan a job on this dataset would get; `overrides` as for jobs
        (steps, batch_size, base_lr, crop, precrop, mixup_alpha, ...) plus validation_fraction."""
        params = {"base_model": base_model, **{k: v for k, v in overrides.items() if v is not None}}
        return cast(PlanEstimate, self._get(f"/v1/datasets/{_seg(dataset_id)}/plan", params))

    def base_models(self) -> list[BaseModel]:
        return cast(list[BaseModel], self._get("/v1/base-models")["items"])

    # -- jobs --------------------------------------------------------------------------------

    def create_job(
        self,
        dataset_id: str,
        base_model: str,
        overrides: dict[str, Any] | None = None,
        validation_fraction: float = 0.1,
        seed: int = 0,
        name: str | None = None,
        idempotency_key: str | None = None,
        serving_precision: str = "fp32",
    ) -> Job:
        """Queue a fine-tuning job. The Idempotency-Key (given, or a fresh one) makes a retried
        request return the same job instead of starting another. serving_precision="int8":
        serve in int8 if it agrees with float32 on the validation split (metrics.precision)."""
        body: dict[str, Any] = {
            "dataset_id": dataset_id,
            "base_model": base_model,
            "validation_fraction": validation_fraction,
            "seed": seed,
            "overrides": overrides or {},
        }
        if serving_precision != "fp32":  # sent only when asked: older servers refuse the field
            body["serving_precision"] = serving_precision
        if name is not None:
            body["name"] = name
        key = idempotency_key or f"bitserve-client-{uuid.uuid4().hex}"
        response = self._request(
            "POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}, idempotent=True
        )
        return cast(Job, response.json())

    def get_job(self, job_id: str) -> Job:
        return cast(Job, self._get(f"/v1/jobs/{_seg(job_id)}"))

    def job_metrics(self, job_id: str) -> JobMetrics:
        """The job's training curves so far: loss, learning rate, images/s, validation."""
        return cast(JobMetrics, self._get(f"/v1/jobs/{_seg(job_id)}/metrics"))

    def job_metrics_csv(self, job_id: str) -> str:
        """The same curves as CSV: step,loss,lr,images_per_second,val_accuracy,val_loss."""
        answer = self._request(
            "GET", f"/v1/jobs/{_seg(job_id)}/metrics", headers={"Accept": "text/csv"}
        )
        return answer.text

    def list_jobs(self, status: str | None = None, *, page_size: int = PAGE_SIZE) -> Iterator[Job]:
        """Every job (in `status` if given), newest first, page by page."""
        params = {"status": status} if status else {}
        return cast(Iterator[Job], self._pages("/v1/jobs", params, page_size))

    def cancel_job(self, job_id: str) -> Job:
        return cast(Job, self._request("POST", f"/v1/jobs/{_seg(job_id)}/cancel").json())

    def watch_job(
        self, job_id: str, *, timeout: float | None = None, poll_interval: float = 1.0
    ) -> Iterator[JobEvent]:
        """The job's events until it finishes, ending with `done` (data: the finished job).

        Reads the Server-Sent Events stream, opening a new one when the server ends it with
        `reconnect` (its maximum lifetime); if it cannot be opened (e.g. 429 too_many_streams)
        or breaks off, polls GET /v1/jobs/{id} instead and makes the same events from the
        changes it sees (bitserve_client.follow).
        Raises JobTimeout once `timeout` seconds have passed without the end.
        """

        def timed_out(after: float, last: dict[str, Any] | None) -> Exception:
            return JobTimeout(job_id, after, last)

        target = Target(
            f"/v1/jobs/{_seg(job_id)}/events",
            lambda: dict(self.get_job(job_id)),
            FINISHED,
            timed_out,
        )
        return follow(
            self._stream,
            target,
            connect_timeout=self.timeout,
            timeout=timeout,
            poll_interval=poll_interval,
        )

    def wait_for_job(
        self,
        job_id: str,
        timeout: float | None = None,
        on_progress: Callable[[ProgressEvent], object] | None = None,
        *,
        poll_interval: float = 1.0,
    ) -> Job:
        """Block until the job finishes; return it if it succeeded, else raise JobFailed
        (with the job's error code and message). `on_progress` gets each progress update."""
        for event in self.watch_job(job_id, timeout=timeout, poll_interval=poll_interval):
            if event.event == "progress" and on_progress is not None:
                on_progress(cast(ProgressEvent, event.data))
            elif event.event == "done":
                job = cast(Job, event.data)
                if job.get("status") != "succeeded":
                    raise JobFailed(dict(job))
                return job
        raise AssertionError("unreachable: watch_job ends with done or raises")  # pragma: no cover

    # -- models ------------------------------------------------------------------------------

    def list_models(self, *, page_size: int = PAGE_SIZE) -> Iterator[Model]:
        """Every model, newest first, page by page."""
        return cast(Iterator[Model], self._pages("/v1/models", {}, page_size))

    def get_model(self, model_id: str) -> Model:
        return cast(Model, self._get(f"/v1/models/{_seg(model_id)}"))

    def delete_model(self, model_id: str) -> None:
        self._request("DELETE", f"/v1/models/{_seg(model_id)}")

    def download_artifact(
        self, model_id: str, dest: str | os.PathLike[str], *, format: str = "safetensors"
    ) -> Path:
        """Save the model's artifact to `dest` (a file, or a folder to put `<model_id>.zip` or
        `<model_id>.onnx` in); the file appears only once complete. format="safetensors": a
        .zip of the weights and metadata.json; format="onnx": the ONNX graph (exported by the
        server on first request; input and preprocessing in its metadata_props)."""
        if format not in ("safetensors", "onnx"):
            raise ValueError(f"format must be 'safetensors' or 'onnx', got {format!r}")
        target = Path(dest)
        if target.is_dir():
            target = target / f"{model_id}.{'onnx' if format == 'onnx' else 'zip'}"
        path = f"/v1/models/{_seg(model_id)}/artifact"
        with self._stream("GET", path, params={"format": format}) as response:
            _save(response, target)
        return target

    # -- evaluations ---------------------------------------------------------------------------

    def evaluate_model(self, model_id: str, dataset_id: str) -> Evaluation:
        """Ask a worker to score the model on a labelled dataset (uploaded as any dataset,
        its class folders named like the model's classes); returns the queued evaluation."""
        body = {"dataset_id": dataset_id}
        answer = self._request("POST", f"/v1/models/{_seg(model_id)}/evaluations", json=body)
        return cast(Evaluation, answer.json())

    def get_evaluation(self, evaluation_id: str) -> Evaluation:
        return cast(Evaluation, self._get(f"/v1/evaluations/{_seg(evaluation_id)}"))

    def list_evaluations(
        self, model_id: str, *, page_size: int = PAGE_SIZE
    ) -> Iterator[Evaluation]:
        """The model's evaluations, newest first; the last is its fine-tune's validation."""
        path = f"/v1/models/{_seg(model_id)}/evaluations"
        return cast(Iterator[Evaluation], self._pages(path, {}, page_size))

    def wait_for_evaluation(
        self, evaluation_id: str, timeout: float | None = None, *, poll_interval: float = 1.0
    ) -> Evaluation:
        """Poll until the evaluation ends; return it if it succeeded, else raise
        EvaluationFailed (with the server's error code and message); EvaluationTimeout after
        `timeout` seconds (the evaluation keeps running)."""
        last, ended = _poll_until_ended(
            lambda: dict(self.get_evaluation(evaluation_id)), timeout, poll_interval
        )
        if not ended:
            raise EvaluationTimeout(evaluation_id, timeout or 0.0, last)
        if last["status"] != "succeeded":
            raise EvaluationFailed(last)
        return cast(Evaluation, last)

    def example_thumbnail(self, evaluation_id: str, index: int) -> bytes:
        """The JPEG thumbnail of one of the evaluation's worst-scored examples."""
        path = f"/v1/evaluations/{_seg(evaluation_id)}/examples/{int(index)}"
        return self._request("GET", path).content

    # -- batch predictions ---------------------------------------------------------------------

    def create_batch_prediction(
        self, model_id: str, dataset_id: str, *, top_k: int = 5, format: str = "csv"
    ) -> BatchPrediction:
        """Ask a worker to predict every file of a dataset with the model (its class folders
        are ignored) into one CSV or JSONL file (format "csv" or "jsonl"); returns the queued
        batch prediction. Files not yet on the server: `upload_dataset` them first (a folder
        or archive of class folders), then pass its id here."""
        body = {"dataset_id": dataset_id, "top_k": top_k, "format": format}
        path = f"/v1/models/{_seg(model_id)}/batch-predictions"
        return cast(BatchPrediction, self._request("POST", path, json=body).json())

    def get_batch_prediction(self, batch_id: str) -> BatchPrediction:
        return cast(BatchPrediction, self._get(f"/v1/batch-predictions/{_seg(batch_id)}"))

    def list_batch_predictions(
        self, model_id: str, *, page_size: int = PAGE_SIZE
    ) -> Iterator[BatchPrediction]:
        """The model's batch predictions, newest first."""
        path = f"/v1/models/{_seg(model_id)}/batch-predictions"
        return cast(Iterator[BatchPrediction], self._pages(path, {}, page_size))

    def cancel_batch_prediction(self, batch_id: str) -> BatchPrediction:
        """Cancel it: a queued one at once, a running one after its current shard."""
        path = f"/v1/batch-predictions/{_seg(batch_id)}/cancel"
        return cast(BatchPrediction, self._request("POST", path).json())

    def wait_for_batch_prediction(
        self,
        batch_id: str,
        timeout: float | None = None,
        *,
        poll_interval: float = 1.0,
        on_progress: Callable[[BatchPrediction], None] | None = None,
    ) -> BatchPrediction:
        """Poll until the batch prediction ends; return it if it succeeded, else raise
        BatchPredictionFailed (failed, with the server's error, or cancelled);
        BatchPredictionTimeout after `timeout` seconds (it keeps running). `on_progress` gets
        each polled state."""

        def poll() -> dict[str, Any]:
            batch = self.get_batch_prediction(batch_id)
            if on_progress is not None:
                on_progress(batch)
            return dict(batch)

        last, ended = _poll_until_ended(poll, timeout, poll_interval)
        if not ended:
            raise BatchPredictionTimeout(batch_id, timeout or 0.0, last)
        if last["status"] != "succeeded":
            raise BatchPredictionFailed(last)
        return cast(BatchPrediction, last)

    def download_batch_predictions(self, batch_id: str, dest: str | os.PathLike[str]) -> Path:
        """Save a succeeded batch prediction's output to `dest` (a file, or a folder to put
        `<id>-predictions.csv` or `.jsonl` in); the file appears only once complete. 409
        `not_finished` (an ApiError) before it succeeded."""
        target = Path(dest)
        path = f"/v1/batch-predictions/{_seg(batch_id)}/output"
        with self._stream("GET", path) as response:
            if target.is_dir():
                kind = response.headers.get("content-type", "")
                suffix = "jsonl" if kind.startswith("application/x-ndjson") else "csv"
                target = target / f"{batch_id}-predictions.{suffix}"
            _save(response, target)
        return target

    def predict(
        self, model_id: str, images: Sequence[ImageInput], top_k: int = 5
    ) -> list[list[Label]]:
        """Classify images (paths, encoded bytes or PIL images): per image, in order, its top_k
        labels with softmax scores, highest first."""
        if isinstance(images, (str, bytes, os.PathLike)) or is_pil(images):
            raise TypeError("images must be a list (of paths, bytes or PIL images)")
        parts = [image_part(i, image) for i, image in enumerate(images)]

        def files(_: ExitStack) -> list[tuple[str, tuple[str, IO[bytes] | bytes, str]]]:
            return [("files", (name, data, "application/octet-stream")) for name, data in parts]

        response = self._request(
            "POST",
            f"/v1/models/{_seg(model_id)}/predict",
            params={"top_k": top_k},
            files=files,
            idempotent=True,  # a pure function of the model and the images
        )
        return [cast(list[Label], p["top_k"]) for p in response.json()["predictions"]]

    # -- audit -------------------------------------------------------------------------------

    def list_audit_events(
        self, tenant: str | None = None, *, page_size: int = PAGE_SIZE
    ) -> Iterator[AuditEvent]:
        """The audit trail (an admin key), newest first: the key's own tenant, or as a global
        admin `tenant`'s (None: every tenant's)."""
        params = {"tenant": tenant} if tenant is not None else {}
        return cast(Iterator[AuditEvent], self._pages("/v1/audit", params, page_size))

    # -- transport ---------------------------------------------------------------------------

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._request("GET", path, params=params).json()

    def _pages(self, path: str, params: dict[str, Any], size: int) -> Iterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            query = {**params, "limit": size, **({"cursor": cursor} if cursor else {})}
            page = self._get(path, query)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        data: dict[str, str] | None = None,
        files: FilesFactory | None = None,
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Send; retry what the module docstring lists, at most max_retries times, each wait
        capped at max_retry_wait (Retry-After, else a doubling back-off); raise ApiError on an
        error answer, or the last httpx.TransportError."""
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        attempt = 0
        while True:
            try:
                with ExitStack() as stack:
                    response = self._http.request(
                        method,
                        path,
                        params=params,
                        json=json,
                        data=data,
                        files=files(stack) if files is not None else None,
                        headers=headers,
                        timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                    )
            except httpx.TransportError as exc:
                wait = self._retry.after_lost_connection(
                    exc, idempotent=idempotent, attempt=attempt
                )
                if wait is None:
                    raise
                time.sleep(wait)
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            error = ApiError.from_response(response)
            wait = self._retry.after_error(
                response.status_code, error, idempotent=idempotent, attempt=attempt
            )
            if wait is None:
                raise error
            time.sleep(wait)
            attempt += 1

    @contextmanager
    def _stream(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        params: dict[str, str] | None = None,
    ) -> Iterator[httpx.Response]:
        wait = timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT
        with self._http.stream(
            method, path, headers=headers, timeout=wait, params=params
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError.from_response(response)
            yield response


# -- helpers ---------------------------------------------------------------------------------


def default_api_key() -> str | None:
    """$BITSERVE_API_KEY, else the key in $BITSERVE_HOME/admin.key, else None."""
    key = os.environ.get("BITSERVE_API_KEY", "").strip()
    if key:
        return key
    path = Path(os.environ.get("BITSERVE_HOME", ".bitserve")).expanduser() / "admin.key"
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _seg(value: str) -> str:
    """An id as one path segment: "../x" can never reach another route."""
    return quote(value, safe="")


def _save(response: httpx.Response, target: Path) -> None:
    """Stream an answer's body to `target`; the file appears only once complete."""
    partial = target.with_name(target.name + ".part")
    try:
        with partial.open("wb") as out:
            for chunk in response.iter_bytes(1 << 20):
                out.write(chunk)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def _poll_until_ended(
    get: Callable[[], dict[str, Any]], timeout: float | None, poll_interval: float
) -> tuple[dict[str, Any], bool]:
    """`get()` every `poll_interval` seconds until its status has ended, or `timeout` seconds
    have passed: (the last state, whether it ended)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = get()
        if state.get("status") in FINISHED:
            return state, True
        if deadline is not None and time.monotonic() >= deadline:
            return state, False
        time.sleep(poll_interval)
