"""Uploading datasets in tests: POST /v1/datasets answers 202 `processing`, an ingest worker
makes the dataset ready (or failed); these wait for that, through the public API.

    body = upload_ready(client, archive_bytes, name="flowers")   # the ready dataset
    body = upload_ended(client, archive_bytes)                   # ready or failed, as it ends
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

INGEST_TIMEOUT_S = 90.0


def post_archive(
    http: httpx.Client,
    archive: bytes | Path,
    *,
    filename: str = "data.zip",
    headers: dict[str, str] | None = None,
    **fields: str,
) -> httpx.Response:
    """POST /v1/datasets with `archive` as the file part; the answer as it came."""
    body = archive.read_bytes() if isinstance(archive, Path) else archive
    return http.post(
        "/v1/datasets",
        files={"file": (filename, body, "application/octet-stream")},
        data=fields or None,
        headers=headers,
    )


def wait_dataset(
    http: httpx.Client,
    dataset_id: str,
    *,
    timeout: float = INGEST_TIMEOUT_S,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Poll GET /v1/datasets/{id} until its status is no longer `processing`."""
    deadline = time.monotonic() + timeout
    while True:
        response = http.get(f"/v1/datasets/{dataset_id}", headers=headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] != "processing":
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"dataset {dataset_id} still processing after {timeout} s: {body}")
        time.sleep(0.1)


def upload_ended(
    http: httpx.Client,
    archive: bytes | Path,
    *,
    filename: str = "data.zip",
    headers: dict[str, str] | None = None,
    timeout: float = INGEST_TIMEOUT_S,
    **fields: str,
) -> dict[str, Any]:
    """Upload, check the 202 `processing` answer, and return the dataset once it ended."""
    response = post_archive(http, archive, filename=filename, headers=headers, **fields)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "processing", accepted
    assert response.headers["location"] == f"/v1/datasets/{accepted['id']}"
    return wait_dataset(http, accepted["id"], timeout=timeout, headers=headers)


def upload_ready(
    http: httpx.Client,
    archive: bytes | Path,
    *,
    filename: str = "data.zip",
    headers: dict[str, str] | None = None,
    timeout: float = INGEST_TIMEOUT_S,
    **fields: str,
) -> dict[str, Any]:
    """Upload and return the ready dataset (fails with its error if ingestion failed)."""
    body = upload_ended(
        http, archive, filename=filename, headers=headers, timeout=timeout, **fields
    )
    assert body["status"] == "ready", body
    return body


def upload_failed(
    http: httpx.Client,
    archive: bytes | Path,
    *,
    filename: str = "data.zip",
    headers: dict[str, str] | None = None,
    timeout: float = INGEST_TIMEOUT_S,
    **fields: str,
) -> dict[str, Any]:
    """Upload an archive ingestion must refuse; returns the failed dataset's `error`."""
    body = upload_ended(
        http, archive, filename=filename, headers=headers, timeout=timeout, **fields
    )
    assert body["status"] == "failed", body
    assert body["progress"] is None and body["num_images"] == 0, body
    error: dict[str, Any] = body["error"]
    return error
