"""Errors the client raises: the API's error shape as an exception, a server that is not
answering, a job's unhappy end, and a dataset whose ingestion failed."""

from __future__ import annotations

from typing import Any

import httpx


class BitserveError(Exception):
    """Base class of everything this client raises on purpose."""


class ApiError(BitserveError):
    """An error answer from the API: `{"error": {"code", "message", "details"}}` (docs/api.md).

    An answer not in that shape (a proxy's HTML page, a bare 502) still becomes an ApiError,
    with code "http_<status>" and the start of the body as its message.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details: dict[str, Any] = details or {}
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        status = response.status_code
        code, message, details = f"http_{status}", "", None
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            code = error["code"]
            message = str(error.get("message") or "")
            raw_details = error.get("details")
            details = raw_details if isinstance(raw_details, dict) else None
        else:
            text = response.text.strip()
            message = text[:500] if text else response.reason_phrase or "no message"
        return cls(status, code, message, details, retry_after=retry_after_seconds(response))


# The status the synchronous upload answered each ingestion error with, before ingestion moved
# to a worker (docs/api.md): a failed dataset carries no HTTP status of its own, and callers
# that checked `status == 422` on an upload keep working. Codes not listed were 422.
INGEST_ERROR_STATUS = {"archive_too_large": 413, "insufficient_storage": 507}


class DatasetFailed(ApiError):
    """A dataset whose ingestion ended `failed`: an ApiError with the dataset's error code,
    message and details (what the upload itself used to answer), and `status` the HTTP status
    that upload answered (INGEST_ERROR_STATUS, else 422). `dataset` is the failed dataset."""

    def __init__(self, dataset: dict[str, Any]) -> None:
        error = dataset.get("error") or {}
        code = str(error.get("code") or "ingest_failed")
        details = error.get("details")
        super().__init__(
            INGEST_ERROR_STATUS.get(code, 422),
            code,
            str(error.get("message") or "the dataset could not be ingested"),
            details if isinstance(details, dict) else None,
        )
        self.dataset = dataset
        self.dataset_id: str = dataset.get("id", "")


class ServerUnreachable(BitserveError, httpx.ConnectError):
    """Nothing answered at the server's address (connection refused or timed out, or the name
    did not resolve) on any try: raised once the retries (bitserve_client.retries) are spent.

    Also an httpx.ConnectError, which the client raised bare before, so code that catches that
    keeps working. `url` is the server's address; `reason` the last connection error's text.
    """

    def __init__(self, url: str, reason: str = "", *, request: httpx.Request | None = None) -> None:
        super().__init__(
            f"the bitserve server at {url} is not answering; start it with `bitserve up` (or "
            "`docker compose up`), or point BITSERVE_URL / --url at a running one",
            request=request,
        )
        self.url = url
        self.reason = reason

    @classmethod
    def from_error(cls, url: str, exc: httpx.TransportError) -> ServerUnreachable:
        try:
            request: httpx.Request | None = exc.request
        except RuntimeError:  # httpx raises it for an error that was made without one
            request = None
        return cls(url, str(exc) or type(exc).__name__, request=request)


class DatasetTimeout(BitserveError, TimeoutError):
    """wait_for_dataset's timeout passed while the dataset was still processing (its
    ingestion goes on)."""

    def __init__(self, dataset_id: str, timeout: float, last: dict[str, Any] | None) -> None:
        self.dataset_id = dataset_id
        self.timeout = timeout
        self.last = last
        progress = (last or {}).get("progress") or {}
        phase = progress.get("phase", "unknown")
        super().__init__(
            f"dataset {dataset_id} still processing after {timeout} s (last phase {phase})"
        )


class JobFailed(BitserveError):
    """A job ended without a model: failed (with the server's error) or cancelled."""

    def __init__(self, job: dict[str, Any]) -> None:
        error = job.get("error") or {}
        self.job = job
        self.job_id: str = job.get("id", "")
        self.status: str = job.get("status", "")
        self.code: str = error.get("code") or self.status or "failed"
        self.message: str = error.get("message") or f"job ended {self.status}"
        super().__init__(f"job {self.job_id} {self.status}: {self.code}: {self.message}")


class JobTimeout(BitserveError, TimeoutError):
    """wait_for_job's timeout passed before the job finished (the job keeps running)."""

    def __init__(self, job_id: str, timeout: float, last: dict[str, Any] | None) -> None:
        self.job_id = job_id
        self.timeout = timeout
        self.last = last
        status = last.get("status") if last else "unknown"
        super().__init__(f"job {job_id} not finished after {timeout} s (last status {status})")


class EvaluationFailed(BitserveError):
    """An evaluation ended failed (e.g. unknown_labels, dataset_failed)."""

    def __init__(self, evaluation: dict[str, Any]) -> None:
        error = evaluation.get("error") or {}
        self.evaluation = evaluation
        self.evaluation_id: str = evaluation.get("id", "")
        self.code: str = error.get("code") or "failed"
        self.message: str = error.get("message") or "evaluation failed"
        super().__init__(f"evaluation {self.evaluation_id} failed: {self.code}: {self.message}")


class EvaluationTimeout(BitserveError, TimeoutError):
    """wait_for_evaluation's timeout passed first (the evaluation keeps running)."""

    def __init__(self, evaluation_id: str, timeout: float, last: dict[str, Any]) -> None:
        self.evaluation_id, self.timeout, self.last = evaluation_id, timeout, last
        status = last.get("status", "unknown")
        super().__init__(
            f"evaluation {evaluation_id} not finished after {timeout} s (last status {status})"
        )


class BatchPredictionFailed(BitserveError):
    """A batch prediction ended without an output: failed (with the server's error) or
    cancelled."""

    def __init__(self, batch: dict[str, Any]) -> None:
        error = batch.get("error") or {}
        self.batch_prediction = batch
        self.batch_prediction_id: str = batch.get("id", "")
        self.status: str = batch.get("status", "")
        self.code: str = error.get("code") or self.status or "failed"
        self.message: str = error.get("message") or f"batch prediction ended {self.status}"
        super().__init__(
            f"batch prediction {self.batch_prediction_id} {self.status}: "
            f"{self.code}: {self.message}"
        )


class BatchPredictionTimeout(BitserveError, TimeoutError):
    """wait_for_batch_prediction's timeout passed first (the batch prediction keeps running)."""

    def __init__(self, batch_id: str, timeout: float, last: dict[str, Any]) -> None:
        self.batch_prediction_id, self.timeout, self.last = batch_id, timeout, last
        status = last.get("status", "unknown")
        super().__init__(
            f"batch prediction {batch_id} not finished after {timeout} s (last status {status})"
        )


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date (RFC 9110 10.2.3); None if absent."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from datetime import UTC, datetime
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
