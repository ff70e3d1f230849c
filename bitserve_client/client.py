"""BitserveClient: the REST API v1 (docs/api.md) from Python, on a synchronous httpx client.

    with BitserveClient("http://127.0.0.1:8000") as api:
        dataset = api.upload_dataset("photos/")            # a folder is zipped on the fly;
                                                           # returns once the dataset is ready
        job = api.create_job(dataset["id"], "BiT-M-R50x1")
        job = api.wait_for_job(job["id"], on_progress=print)
        print(api.predict(job["model_id"], ["cat.jpg"], top_k=3))

Retries (bounded by `max_retries` and `max_retry_wait`, docs/api.md "Retries"): a 429 answer,
and a 503 `shutting_down` or `too_many_uploads` (refused before any work), are retried after
their Retry-After for every call; other 503 answers and lost connections (refused, reset,
closed without an answer: a gateway restarting) only for idempotent calls: GET, DELETE,
predict (a pure function, through a model or a deployment), a deployment's update (it states
the whole new target set) and job creation (sent with an Idempotency-Key, a fresh one per
call unless given, so a retry never starts a second job). An upload (a POST that creates a
dataset), a deployment's creation or rollback are thus sent again only when the server did
nothing with them, never after a lost answer or another 503. Not retried: the streamed
artifact download, and the event streams of jobs and datasets (they fall back to polling
instead). Every other error answer raises ApiError with the server's code, message and
details; a dataset whose ingestion failed raises DatasetFailed, an ApiError with the code,
message and details the failed dataset carries. A server that never answered (every try
refused, or timed out connecting) raises ServerUnreachable, which says how to start one.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any, cast

import httpx

from bitserve_client.deployments import DeploymentMethods
from bitserve_client.errors import DatasetFailed, DatasetTimeout, JobFailed, JobTimeout
from bitserve_client.files import ARCHIVE_TYPES, zip_folder
from bitserve_client.follow import Target, follow
from bitserve_client.schema import (
    AuditEvent,
    BaseModel,
    Dataset,
    IngestProgressEvent,
    Job,
    JobEvent,
    JobMetrics,
    Model,
    PlanEstimate,
    ProgressEvent,
    Rejected,
)
from bitserve_client.scoring import ScoringMethods
from bitserve_client.transport import (
    DEFAULT_URL,
    FINISHED,
    PAGE_SIZE,
    default_api_key,
    save,
    seg,
)

DATASET_ENDED = frozenset({"ready", "failed"})


class BitserveClient(ScoringMethods, DeploymentMethods):
    """A bitserve server's API. Thread-safe as httpx.Client is; close() or use `with`.

    `api_key` defaults to $BITSERVE_API_KEY, else the admin key `bitserve up` wrote to
    $BITSERVE_HOME/admin.key (BITSERVE_HOME defaults to ./.bitserve); api_key="" sends none.
    """

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
        return cast(Dataset, self._get(f"/v1/datasets/{seg(dataset_id)}"))

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
            f"/v1/datasets/{seg(dataset_id)}/events",
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
        path = f"/v1/datasets/{seg(dataset_id)}/rejected"
        return cast(Iterator[Rejected], self._pages(path, {}, page_size))

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/v1/datasets/{seg(dataset_id)}")

    def plan(self, dataset_id: str, base_model: str, **overrides: Any) -> PlanEstimate:
        """The BiT-HyperRule plan a job on this dataset would get; `overrides` as for jobs
        (steps, batch_size, base_lr, crop, precrop, mixup_alpha, ...) plus validation_fraction."""
        params = {"base_model": base_model, **{k: v for k, v in overrides.items() if v is not None}}
        return cast(PlanEstimate, self._get(f"/v1/datasets/{seg(dataset_id)}/plan", params))

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
        *,
        deploy_to: str | None = None,
        deploy_if_better: bool = False,
    ) -> Job:
        """Queue a fine-tuning job. The Idempotency-Key (given, or a fresh one) makes a retried
        request return the same job instead of starting another. serving_precision="int8":
        serve in int8 if it agrees with float32 on the validation split (metrics.precision).
        deploy_to="pets": point that deployment at the model when the job succeeds (made if
        missing); with deploy_if_better, only if it scores higher than the deployment's current
        target on the job's validation split (the job's `deployment` says what happened)."""
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
        if deploy_to is not None:
            body["deploy_to"] = deploy_to
        if deploy_if_better:
            body["deploy_if_better"] = True
        key = idempotency_key or f"bitserve-client-{uuid.uuid4().hex}"
        response = self._request(
            "POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}, idempotent=True
        )
        return cast(Job, response.json())

    def get_job(self, job_id: str) -> Job:
        return cast(Job, self._get(f"/v1/jobs/{seg(job_id)}"))

    def job_metrics(self, job_id: str) -> JobMetrics:
        """The job's training curves so far: loss, learning rate, images/s, validation."""
        return cast(JobMetrics, self._get(f"/v1/jobs/{seg(job_id)}/metrics"))

    def job_metrics_csv(self, job_id: str) -> str:
        """The same curves as CSV: step,loss,lr,images_per_second,val_accuracy,val_loss."""
        answer = self._request(
            "GET", f"/v1/jobs/{seg(job_id)}/metrics", headers={"Accept": "text/csv"}
        )
        return answer.text

    def list_jobs(self, status: str | None = None, *, page_size: int = PAGE_SIZE) -> Iterator[Job]:
        """Every job (in `status` if given), newest first, page by page."""
        params = {"status": status} if status else {}
        return cast(Iterator[Job], self._pages("/v1/jobs", params, page_size))

    def cancel_job(self, job_id: str) -> Job:
        return cast(Job, self._request("POST", f"/v1/jobs/{seg(job_id)}/cancel").json())

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
            f"/v1/jobs/{seg(job_id)}/events",
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
        return cast(Model, self._get(f"/v1/models/{seg(model_id)}"))

    def delete_model(self, model_id: str) -> None:
        self._request("DELETE", f"/v1/models/{seg(model_id)}")

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
        path = f"/v1/models/{seg(model_id)}/artifact"
        with self._stream("GET", path, params={"format": format}) as response:
            save(response, target)
        return target

    # -- audit -------------------------------------------------------------------------------

    def list_audit_events(
        self, tenant: str | None = None, *, page_size: int = PAGE_SIZE
    ) -> Iterator[AuditEvent]:
        """The audit trail (an admin key), newest first: the key's own tenant, or as a global
        admin `tenant`'s (None: every tenant's)."""
        params = {"tenant": tenant} if tenant is not None else {}
        return cast(Iterator[AuditEvent], self._pages("/v1/audit", params, page_size))


__all__ = ["DEFAULT_URL", "BitserveClient", "default_api_key"]
