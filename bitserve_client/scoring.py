"""The calls that score with a model: evaluations on a labelled dataset, batch predictions over
a whole dataset, and predict on images sent with the request (BitserveClient inherits them)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any, cast

import httpx

from bitserve_client.errors import (
    BatchPredictionFailed,
    BatchPredictionTimeout,
    EvaluationFailed,
    EvaluationTimeout,
)
from bitserve_client.files import ARCHIVE_TYPES, ImageInput, image_parts, zip_folder
from bitserve_client.schema import Label
from bitserve_client.schema_scoring import BatchPrediction, Evaluation
from bitserve_client.transport import PAGE_SIZE, Transport, poll_until_ended, save, seg


class ScoringMethods(Transport):
    """Evaluations, batch predictions and predict (retries and errors: bitserve_client.client)."""

    def _post_archive(
        self, path: str, archive: str | os.PathLike[str], fields: dict[str, str]
    ) -> httpx.Response:
        """POST a .zip / .tar.gz (or a folder, zipped into a temp file first) as the `file`
        part of a multipart form, beside `fields`; streamed, opened again per retry."""
        source = Path(archive)
        if not source.exists():
            raise FileNotFoundError(f"no such file or folder: {source}")
        with ExitStack() as cleanup:
            if source.is_dir():
                tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bitserve-upload-"))
                source = zip_folder(source, Path(tmp) / f"{source.name or 'dataset'}.zip")
            media = ARCHIVE_TYPES.get(source.suffix.lower(), "application/octet-stream")

            def files(stack: ExitStack) -> list[tuple[str, tuple[str, IO[bytes] | bytes, str]]]:
                return [("file", (source.name, stack.enter_context(source.open("rb")), media))]

            # No read timeout: the server stores the whole archive before it answers.
            wait = httpx.Timeout(self.timeout, read=None)
            return self._request("POST", path, files=files, data=fields, timeout=wait)

    # -- evaluations ---------------------------------------------------------------------------

    def evaluate_model(
        self,
        model_id: str,
        dataset_id: str | None = None,
        *,
        archive: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> Evaluation:
        """Ask a worker to score the model on a labelled dataset, its class folders named like
        the model's classes: a stored one (`dataset_id`), or `archive` (a .zip / .tar.gz of
        `<class>/<image>` folders, or such a folder, zipped first) sent in the same request
        and stored as a new dataset (`name`; its id is the evaluation's dataset_id). Returns
        the queued evaluation."""
        path = f"/v1/models/{seg(model_id)}/evaluations"
        if archive is not None:
            if dataset_id is not None:
                raise ValueError("give dataset_id or archive, not both")
            fields = {"name": name} if name is not None else {}
            return cast(Evaluation, self._post_archive(path, archive, fields).json())
        if dataset_id is None:
            raise ValueError("give dataset_id or archive")
        answer = self._request("POST", path, json={"dataset_id": dataset_id})
        return cast(Evaluation, answer.json())

    def get_evaluation(self, evaluation_id: str) -> Evaluation:
        return cast(Evaluation, self._get(f"/v1/evaluations/{seg(evaluation_id)}"))

    def list_evaluations(
        self, model_id: str, *, page_size: int = PAGE_SIZE
    ) -> Iterator[Evaluation]:
        """The model's evaluations, newest first; the last is its fine-tune's validation."""
        path = f"/v1/models/{seg(model_id)}/evaluations"
        return cast(Iterator[Evaluation], self._pages(path, {}, page_size))

    def wait_for_evaluation(
        self, evaluation_id: str, timeout: float | None = None, *, poll_interval: float = 1.0
    ) -> Evaluation:
        """Poll until the evaluation ends; return it if it succeeded, else raise
        EvaluationFailed (with the server's error code and message); EvaluationTimeout after
        `timeout` seconds (the evaluation keeps running)."""
        last, ended = poll_until_ended(
            lambda: dict(self.get_evaluation(evaluation_id)), timeout, poll_interval
        )
        if not ended:
            raise EvaluationTimeout(evaluation_id, timeout or 0.0, last)
        if last["status"] != "succeeded":
            raise EvaluationFailed(last)
        return cast(Evaluation, last)

    def example_thumbnail(self, evaluation_id: str, index: int) -> bytes:
        """The JPEG thumbnail of one of the evaluation's worst-scored examples."""
        path = f"/v1/evaluations/{seg(evaluation_id)}/examples/{int(index)}"
        return self._request("GET", path).content

    # -- batch predictions ---------------------------------------------------------------------

    def create_batch_prediction(
        self,
        model_id: str,
        dataset_id: str | None = None,
        *,
        archive: str | os.PathLike[str] | None = None,
        name: str | None = None,
        top_k: int = 5,
        format: str = "csv",
    ) -> BatchPrediction:
        """Ask a worker to predict every file of a dataset with the model (its class folders
        are ignored) into one CSV or JSONL file (format "csv" or "jsonl"): a stored dataset
        (`dataset_id`), or `archive` (a .zip / .tar.gz laid out as a dataset, or such a
        folder, zipped first) sent in the same request and stored as a new dataset (`name`).
        Returns the queued batch prediction."""
        path = f"/v1/models/{seg(model_id)}/batch-predictions"
        if archive is not None:
            if dataset_id is not None:
                raise ValueError("give dataset_id or archive, not both")
            fields = {"top_k": str(top_k), "format": format}
            if name is not None:
                fields["name"] = name
            return cast(BatchPrediction, self._post_archive(path, archive, fields).json())
        if dataset_id is None:
            raise ValueError("give dataset_id or archive")
        body = {"dataset_id": dataset_id, "top_k": top_k, "format": format}
        return cast(BatchPrediction, self._request("POST", path, json=body).json())

    def get_batch_prediction(self, batch_id: str) -> BatchPrediction:
        return cast(BatchPrediction, self._get(f"/v1/batch-predictions/{seg(batch_id)}"))

    def list_batch_predictions(
        self, model_id: str, *, page_size: int = PAGE_SIZE
    ) -> Iterator[BatchPrediction]:
        """The model's batch predictions, newest first."""
        path = f"/v1/models/{seg(model_id)}/batch-predictions"
        return cast(Iterator[BatchPrediction], self._pages(path, {}, page_size))

    def cancel_batch_prediction(self, batch_id: str) -> BatchPrediction:
        """Cancel it: a queued one at once, a running one after its current shard."""
        path = f"/v1/batch-predictions/{seg(batch_id)}/cancel"
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

        last, ended = poll_until_ended(poll, timeout, poll_interval)
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
        path = f"/v1/batch-predictions/{seg(batch_id)}/output"
        with self._stream("GET", path) as response:
            if target.is_dir():
                kind = response.headers.get("content-type", "")
                suffix = "jsonl" if kind.startswith("application/x-ndjson") else "csv"
                target = target / f"{batch_id}-predictions.{suffix}"
            save(response, target)
        return target

    def predict(
        self, model_id: str, images: Sequence[ImageInput], top_k: int = 5
    ) -> list[list[Label]]:
        """Classify images (paths, encoded bytes or PIL images): per image, in order, its top_k
        labels with softmax scores, highest first."""
        parts = image_parts(images)
        response = self._request(
            "POST",
            f"/v1/models/{seg(model_id)}/predict",
            params={"top_k": top_k},
            files=lambda _: parts,
            idempotent=True,  # a pure function of the model and the images
        )
        return [cast(list[Label], p["top_k"]) for p in response.json()["predictions"]]
