"""bitserve_client.cli without a server: the text it prints (numbers, summaries, progress
lines of jobs and datasets) and its tables. Against a live server:
tests/integration/cli_remote/."""

from __future__ import annotations

import pytest

from bitserve_client.cli import render
from tests.unit.cli_remote_helpers import JOB_ID, job, progress, rendered

# -- numbers and lines -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "text"),
    [(None, "?"), (0, "0 B"), (999, "999 B"), (56_700, "56.7 kB"), (1_234_567, "1.2 MB")],
)
def test_fmt_bytes(count: int | None, text: str) -> None:
    assert render.fmt_bytes(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "?"), (0.4, "0s"), (45, "45s"), (185, "3m05s"), (3725, "1h02m"), (-3, "0s")],
)
def test_fmt_duration(seconds: float | None, text: str) -> None:
    assert render.fmt_duration(seconds) == text


def test_fmt_time_and_percent() -> None:
    assert render.fmt_time("2026-12-02T08:30:00.123456Z") == "2026-12-02 08:30:00Z"
    assert render.fmt_time(None) == "-"
    assert (render.fmt_percent(0.875), render.fmt_percent(None)) == ("87.5%", "-")


def test_the_summary_of_a_job_that_succeeded() -> None:
    done = job("succeeded", model_id="mdl_x", metrics={"accuracy": 0.875})
    assert render.job_summary(done) == (
        f"job {JOB_ID} succeeded: 12/12 steps, final loss 0.0412, accuracy 87.5%, model mdl_x"
    )
    no_split = job("succeeded", model_id="mdl_x", metrics={"accuracy": None})
    assert render.job_summary(no_split) == (
        f"job {JOB_ID} succeeded: 12/12 steps, final loss 0.0412, "
        "no validation accuracy (no validation split), model mdl_x"
    )


def test_the_summary_of_a_job_that_failed_or_was_cancelled() -> None:
    error = {"code": "out_of_memory", "message": "try micro_batch_size 8"}
    assert render.job_summary(job("failed", 3, error=error)) == (
        f"job {JOB_ID} failed: 3/12 steps, final loss 0.0412, "
        "error out_of_memory: try micro_batch_size 8"
    )
    queued = job("cancelled", 0, progress=progress(0, phase=None))
    assert render.job_summary(queued) == f"job {JOB_ID} cancelled: 0/12 steps"


def test_progress_lines() -> None:
    training = progress(6, loss=0.69314, images_per_second=52.34, eta_seconds=4.2)
    assert render.job_progress_line(JOB_ID, training) == (
        f"{JOB_ID}: step 6/12, loss 0.6931, 52.3 images/s, ETA 4s"
    )
    assert render.job_progress_line(JOB_ID, training, live=False) == (
        f"{JOB_ID}: step 6/12, loss 0.6931"
    )
    assert render.job_progress_line(JOB_ID, progress(0)) == f"{JOB_ID}: step 0/12"
    download = progress(0, phase="downloading", downloaded_bytes=12_000_000, total_bytes=98_000_000)
    assert render.job_progress_line(JOB_ID, download) == (
        f"{JOB_ID}: downloading the base checkpoint, 12.0 MB of 98.0 MB"
    )
    assert render.dataset_progress_line("ds_x", {"phase": "indexing", "done": 3, "total": 9}) == (
        "ds_x: indexing 3/9"
    )
    assert render.dataset_progress_line("ds_x", {"phase": "queued", "done": None}) == "ds_x: queued"


def test_dataset_summary() -> None:
    ready = {
        "id": "ds_x",
        "name": "pets",
        "status": "ready",
        "num_images": 40,
        "num_classes": 2,
        "rejected_count": 3,
        "rejected_reasons": {"unsupported_format": 2, "truncated": 1},
    }
    assert render.dataset_summary(ready) == (
        "dataset ds_x ready: 40 images in 2 classes (pets), "
        "3 files rejected (unsupported_format 2, truncated 1)"
    )
    assert render.dataset_summary({**ready, "rejected_count": 0}) == (
        "dataset ds_x ready: 40 images in 2 classes (pets)"
    )
    failed = {
        "id": "ds_x",
        "status": "failed",
        "error": {"code": "too_few_classes", "message": "m"},
    }
    assert render.dataset_summary(failed) == "dataset ds_x failed: too_few_classes: m"


def test_tables_have_no_padding_and_take_no_markup() -> None:
    items = [
        {
            "id": "ds_a",
            "name": "[bold]pets[/bold]",  # a user's name: printed as written
            "status": "processing",
            "progress": {"phase": "indexing", "done": 1, "total": 4},
            "num_images": 0,
            "num_classes": 0,
            "bytes": 1500,
            "created_at": "2026-12-02T08:30:00.5Z",
        }
    ]
    assert rendered(render.datasets_table(items)) == [
        "ID    NAME               STATUS                 IMAGES  CLASSES  SIZE    CREATED",
        "ds_a  [bold]pets[/bold]  processing (indexing)  0       0        1.5 kB  2026-12-02 08:30:00Z",
    ]


def test_predictions_table() -> None:
    one = [[{"label": "cat", "score": 0.98765}], [{"label": "dog", "score": 0.5}]]
    assert rendered(render.predictions_table(["a.png", "b b.png"], one)) == [
        "FILE     LABEL  SCORE",
        "a.png    cat    0.9877",
        "b b.png  dog    0.5000",
    ]
    two = [[{"label": "cat", "score": 0.9}, {"label": "dog", "score": 0.1}]]
    assert rendered(render.predictions_table(["a.png"], two)) == [
        "FILE   LABEL  SCORE   NEXT",
        "a.png  cat    0.9000  dog 0.1000",
    ]
