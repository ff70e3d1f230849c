"""The calls that score with a model: evaluations on a labelled dataset, batch predictions over
a whole dataset, and predict on images sent with the request (BitserveClient inherits them)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from bitserve_client.errors import (
    BatchPredictionFailed,
    BatchPredictionTimeout,
    EvaluationFailed,
    EvaluationTimeout,
)
from bitserve_client.files import ImageInput, image_parts
from bitserve_client.schema import BatchPrediction, Evaluation, Label
from bitserve_client.transport import PAGE_SIZE, Transport, poll_until_ended, save, seg


class ScoringMethods(Transport):
    """Evaluations, batch predictions and predict (retries and errors: bitserve_client.client)."""

    # -- evaluations ---------------------------------------------------------------------------

    def evaluate_model(self, model_id: str, dataset_id: str) -> Evaluation:
        """Ask a worker to score the model on a labelled dataset (uploaded as any dataset,
        its class folders named like the model's classes); returns the queued evaluation."""
        body = {"dataset_id": dataset_id}
        answer = self._request("POST", f"/v1/models/{seg(model_id)}/evaluations", json=body)
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
        self, model_id: str, dataset_id: str, *, top_k: int = 5, format: str = "csv"
    ) -> BatchPrediction:
        """Ask a worker to predict every file of a dataset with the model (its class folders
        are ignored) into one CSV or JSONL file (format "csv" or "jsonl"); returns the queued
        batch prediction. Files not yet on the server: `upload_dataset` them first (a folder
        or archive of class folders), then pass its id here."""
        body = {"dataset_id": dataset_id, "top_k": top_k, "format": format}
        path = f"/v1/models/{seg(model_id)}/batch-predictions"
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
