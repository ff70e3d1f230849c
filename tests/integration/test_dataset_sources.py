"""Datasets registered from a bucket ({"source": "s3://bucket/prefix/"}) on moto's S3 server,
with a real gateway and a real ingest worker: only sources under the buckets the operator
allowed are taken, and the worker copies the class folders as it would extract an archive."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from tests.imagegen import make_image_folder
from tests.integration.conftest import LiveServer, make_settings
from tests.integration.datasets_helpers import wait_dataset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

BUCKET = "lab-data"
ALLOWED = [f"{BUCKET}/shared"]  # the operator's list: one prefix of one bucket


@pytest.fixture
def s3(s3_env: str) -> Any:
    """A client of moto's S3 server (tests/integration/conftest.py), with the source bucket."""
    client = boto3.session.Session().client("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


def put_folder(client: Any, folder: Path, prefix: str) -> int:
    """Every file under `folder` as `prefix<relative path>`; returns the images' bytes."""
    total = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(
            Bucket=BUCKET, Key=prefix + path.relative_to(folder).as_posix(), Body=path.read_bytes()
        )
        if path.suffix != ".txt":
            total += path.stat().st_size
    return total


@pytest.fixture
def server(
    s3: Any,
    tmp_path: Path,
    migrated_db: str,
    redis_url: str,
    start_server: Callable[..., LiveServer],
) -> LiveServer:
    settings = make_settings(
        tmp_path / "home", migrated_db, redis_url, dataset_source_buckets=ALLOWED
    )
    return start_server(settings, ingest=True)


@pytest.fixture
def gateway(
    tmp_path: Path, migrated_db: str, redis_url: str, start_server: Callable[..., LiveServer]
) -> LiveServer:
    """Refusals happen in the gateway: no bucket or worker needed."""
    settings = make_settings(
        tmp_path / "home", migrated_db, redis_url, dataset_source_buckets=ALLOWED
    )
    return start_server(settings)


def register(server: LiveServer, body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/datasets", json=body, headers=server.headers, timeout=30)


def test_a_dataset_is_registered_from_an_allowed_prefix(
    s3: Any, server: LiveServer, tmp_path: Path
) -> None:
    folder = make_image_folder(tmp_path / "pets", {"cat": 3, "dog": 4}, size=(40, 48))
    (folder / "cat" / "notes.txt").write_text("not an image")
    image_bytes = put_folder(s3, folder, "shared/pets/")
    put_folder(s3, make_image_folder(tmp_path / "other", {"emu": 3}), "shared/pets-old/")

    answer = register(server, {"source": f"s3://{BUCKET}/shared/pets"})
    assert answer.status_code == 202, answer.text
    accepted = answer.json()
    assert accepted["status"] == "processing" and accepted["name"] == "pets"
    assert answer.headers["location"] == f"/v1/datasets/{accepted['id']}"

    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as http:
        body = wait_dataset(http, accepted["id"])
    assert body["status"] == "ready", body
    # The folder, not the key prefix: shared/pets-old/ is not part of it.
    assert body["classes"] == [{"name": "cat", "count": 3}, {"name": "dog", "count": 4}]
    assert body["rejected"] == [{"path": "cat/notes.txt", "reason": "unsupported_format"}]
    assert body["bytes"] == image_bytes  # what the copy stores, counted against quotas
    store = server.settings.artifact_root
    assert not (store / "uploads").exists()  # nothing was uploaded
    copied = sorted(
        p.relative_to(store / "datasets" / body["id"] / "files").as_posix()
        for p in (store / "datasets" / body["id"] / "files").rglob("*.png")
    )
    assert len(copied) == 7 and copied[0].startswith("cat/")


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("s3://other-bucket/shared/pets/", "not one the server's operator allowed"),
        (f"s3://{BUCKET}/private/", "not one the server's operator allowed"),
        (f"s3://{BUCKET}/sharedx/", "not one the server's operator allowed"),
        (f"s3://{BUCKET}/shared/../private/", "the prefix must be a plain folder path"),
        ("https://example.com/shared/", "only s3://bucket/prefix/ sources are taken"),
        ("file:///etc/", "only s3://bucket/prefix/ sources are taken"),
        ("s3://Bad_Bucket/x/", "not a valid bucket name"),
        (f"s3://{BUCKET}/shared/a\nb/", "printable characters"),
    ],
)
def test_a_source_outside_the_allowed_buckets_is_refused(
    gateway: LiveServer, source: str, why: str
) -> None:
    answer = register(gateway, {"source": source})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "source_not_allowed" and error["details"] == {"field": "source"}
    assert why in error["message"]


def test_a_source_body_is_checked_like_any_json_body(gateway: LiveServer) -> None:
    answer = register(gateway, {"source": f"s3://{BUCKET}/shared/", "extra": 1})
    assert answer.status_code == 422
    assert answer.json()["error"]["details"]["field"] == "extra"
    answer = httpx.post(
        f"{gateway.url}/v1/datasets",
        content=b"{not json",
        headers={**gateway.headers, "content-type": "application/json"},
    )
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "malformed_request"


def test_a_server_without_sources_refuses_them(
    tmp_path: Path, migrated_db: str, redis_url: str, start_server: Callable[..., LiveServer]
) -> None:
    server = start_server(make_settings(tmp_path / "plain", migrated_db, redis_url))
    answer = register(server, {"source": f"s3://{BUCKET}/shared/"})
    assert answer.status_code == 422
    assert "this server takes no dataset sources" in answer.json()["error"]["message"]


def test_a_missing_bucket_and_a_source_past_the_limits_fail_the_dataset(
    s3: Any, tmp_path: Path, migrated_db: str, redis_url: str,
    start_server: Callable[..., LiveServer],
) -> None:  # fmt: skip
    settings = make_settings(
        tmp_path / "home",
        migrated_db,
        redis_url,
        dataset_source_buckets=["ghost-bucket", BUCKET],
        max_archive_entries=5,
    )
    server = start_server(settings, ingest=True)
    put_folder(s3, make_image_folder(tmp_path / "many", {"a": 3, "b": 3}), "many/")
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as http:
        ghost = register(server, {"source": "s3://ghost-bucket/x/"}).json()
        body = wait_dataset(http, ghost["id"])
        assert body["status"] == "failed"
        assert body["error"]["code"] == "source_unreadable"
        assert body["error"]["details"] == {
            "source": "s3://ghost-bucket/x/",
            "reason": "NoSuchBucket",
        }
        many = register(server, {"source": f"s3://{BUCKET}/many/"}).json()
        body = wait_dataset(http, many["id"])
        assert body["status"] == "failed"
        assert body["error"]["code"] == "archive_too_large"
        assert body["error"]["details"] == {"limit": 5}
        assert body["error"]["message"] == "the source holds more than 5 objects"
