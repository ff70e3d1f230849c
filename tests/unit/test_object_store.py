"""The object store's integrity rules (service.object_store), against moto's standalone S3
server: a folder exists only once its manifest does, and a fetch refuses any object whose size
or SHA-256 differs from the manifest, keeping nothing of it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from service.ids import new_id
from service.object_store import (
    LocalStore,
    ObjectCorrupt,
    ObjectMissing,
    ObjectStoreError,
    S3Store,
    open_store,
    parse_manifest,
)
from service.settings import Settings
from service.storage import Storage
from tests.moto_s3 import moto_server, new_bucket, use_endpoint

MODEL = new_id("mdl")
DATASET = new_id("ds")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_server(tmp_path_factory.mktemp("moto")) as url:
        yield url


@pytest.fixture
def store(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    use_endpoint(monkeypatch, endpoint)
    return S3Store(new_bucket(), "prefix/x")


def s3() -> Any:
    return boto3.session.Session().client("s3")


def make_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"\x01" * 3000)
    (root / "metadata.json").write_text('{"classes": ["a"]}')
    (root / "sub" / "c.bin").write_bytes(b"")
    return root


def test_publish_then_fetch_round_trips_every_file(store: S3Store, tmp_path: Path) -> None:
    source = make_folder(tmp_path / "src")
    assert not store.exists("models/m1")
    store.publish("models/m1", source)
    assert store.exists("models/m1")
    keys = sorted(o["Key"] for o in s3().list_objects_v2(Bucket=store.bucket)["Contents"])
    assert keys == [
        "prefix/x/models/m1.manifest.json",
        "prefix/x/models/m1/metadata.json",
        "prefix/x/models/m1/model.safetensors",
        "prefix/x/models/m1/sub/c.bin",
    ]
    target = tmp_path / "cache" / "m1"
    store.fetch("models/m1", target)
    got = {
        p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()
    }
    want = {
        p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*") if p.is_file()
    }
    assert got == want
    assert [p.name for p in target.parent.iterdir()] == ["m1"]  # no staging folder left


def test_no_manifest_means_not_there(store: S3Store, tmp_path: Path) -> None:
    """Objects without a manifest (a publish that died before its end) are not a folder."""
    s3().put_object(Bucket=store.bucket, Key="prefix/x/models/m2/model.safetensors", Body=b"w")
    assert not store.exists("models/m2")
    with pytest.raises(ObjectMissing):
        store.fetch("models/m2", tmp_path / "m2")
    assert not (tmp_path / "m2").exists()


@pytest.mark.parametrize(
    "tamper",
    [
        b"\x02" * 3000,  # same size, other bytes: only the SHA-256 tells
        b"\x01" * 2999,  # truncated
        b"\x01" * 3001,  # grown
    ],
)
def test_a_tampered_object_is_refused(store: S3Store, tmp_path: Path, tamper: bytes) -> None:
    store.publish("models/m3", make_folder(tmp_path / "src"))
    s3().put_object(Bucket=store.bucket, Key="prefix/x/models/m3/model.safetensors", Body=tamper)
    target = tmp_path / "cache" / "m3"
    with pytest.raises(ObjectCorrupt, match=r"model\.safetensors"):
        store.fetch("models/m3", target)
    assert not target.exists()
    assert list((tmp_path / "cache").iterdir()) == []  # the staging folder is gone too


def test_an_object_listed_but_missing_is_corrupt(store: S3Store, tmp_path: Path) -> None:
    store.publish("models/m4", make_folder(tmp_path / "src"))
    s3().delete_object(Bucket=store.bucket, Key="prefix/x/models/m4/metadata.json")
    with pytest.raises(ObjectCorrupt, match=r"metadata\.json"):
        store.fetch("models/m4", tmp_path / "m4")
    assert not (tmp_path / "m4").exists()


def test_a_manifest_path_leaving_the_folder_is_refused(store: S3Store, tmp_path: Path) -> None:
    evil = {"version": 1, "files": [{"path": "../../escape", "bytes": 1, "sha256": "0" * 64}]}
    s3().put_object(
        Bucket=store.bucket, Key="prefix/x/models/m5.manifest.json", Body=json.dumps(evil)
    )
    with pytest.raises(ObjectCorrupt, match="leaves the folder"):
        store.fetch("models/m5", tmp_path / "a" / "m5")
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize(
    "document",
    [
        b"not json",
        b'{"version": 2, "files": []}',
        b'{"version": 1}',
        b'{"version": 1, "files": [{"path": "/etc/passwd", "bytes": 1, "sha256": "'
        + b"0" * 64
        + b'"}]}',
        b'{"version": 1, "files": [{"path": "a", "bytes": -1, "sha256": "' + b"0" * 64 + b'"}]}',
        b'{"version": 1, "files": [{"path": "a", "bytes": 1, "sha256": "short"}]}',
    ],
)
def test_malformed_manifests_are_corrupt(document: bytes) -> None:
    with pytest.raises(ObjectCorrupt):
        parse_manifest(document)


def test_delete_removes_the_manifest_and_every_object(store: S3Store, tmp_path: Path) -> None:
    store.publish("models/m6", make_folder(tmp_path / "src"))
    store.publish("models/m66", make_folder(tmp_path / "other"))  # a sibling with a longer id
    store.delete("models/m6")
    assert not store.exists("models/m6")
    keys = [o["Key"] for o in s3().list_objects_v2(Bucket=store.bucket)["Contents"]]
    assert all(key.startswith("prefix/x/models/m66") for key in keys) and len(keys) == 4


def test_storage_fetches_on_a_cache_miss_and_discards_everywhere(
    store: S3Store, tmp_path: Path
) -> None:
    writer = Storage(tmp_path / "node-a", store)
    make_folder(writer.model_dir(MODEL))
    writer.publish("models", MODEL)
    reader = Storage(tmp_path / "node-b", store)
    assert not reader.model_dir(MODEL).exists()
    path = reader.ensure_local("models", MODEL)
    assert path == reader.model_dir(MODEL)
    assert (path / "model.safetensors").read_bytes() == b"\x01" * 3000
    reader.discard("models", MODEL)
    assert not path.exists() and not store.exists(f"models/{MODEL}")
    with pytest.raises(ObjectMissing):
        Storage(tmp_path / "node-c", store).ensure_local("models", MODEL)
    with pytest.raises(ValueError):  # ids are checked before any key is built
        reader.ensure_local("models", "../../etc")


def test_readiness_checks_the_bucket(store: S3Store, tmp_path: Path) -> None:
    Storage(tmp_path / "root", store).check()
    with pytest.raises(ObjectStoreError):
        Storage(tmp_path / "root", S3Store("no-such-bucket-here")).check()


def test_storage_url_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_store(None), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    s3store = open_store("s3://bucket/some/prefix")
    assert isinstance(s3store, S3Store)
    assert (s3store.bucket, s3store.prefix) == ("bucket", "some/prefix")
    settings = Settings(home=tmp_path, storage_url=f"file://{tmp_path}/elsewhere")
    assert settings.artifact_root == tmp_path / "elsewhere"
    with pytest.raises(ValueError, match="different directories"):
        Settings(home=tmp_path, storage_url=f"file://{tmp_path}/x", artifact_root=tmp_path / "y")
    for bad in ("ftp://host/x", "s3:///no-bucket"):
        with pytest.raises(ValueError):
            Settings(home=tmp_path, storage_url=bad)


def test_local_store_keeps_todays_behaviour(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "root")
    make_folder(storage.dataset_dir(DATASET))
    storage.publish("datasets", DATASET)  # no copy anywhere
    assert storage.ensure_local("datasets", DATASET) == storage.dataset_dir(DATASET)
    storage.discard("datasets", DATASET)
    assert not storage.dataset_dir(DATASET).exists()
    with pytest.raises(ObjectMissing):
        storage.ensure_local("datasets", DATASET)


def aged(path: Path, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    os.utime(path, (when, when))


def test_the_cache_evicts_least_recently_used_published_idle_folders(
    store: S3Store, tmp_path: Path
) -> None:
    writer = Storage(tmp_path / "writer", store)
    ids = [new_id("mdl") for _ in range(4)]
    for model_id in ids:
        make_folder(writer.model_dir(model_id))  # 3018 bytes each
        writer.publish("models", model_id)
    # Room for three folders: a fourth must make the least recently used idle one go.
    node = Storage(tmp_path / "node", store, cache_max_bytes=9100, cache_min_idle_seconds=60)
    first, second, third, fourth = ids
    node.ensure_local("models", first)
    node.ensure_local("models", second)
    unpublished = new_id("mdl")
    make_folder(node.model_dir(unpublished))  # e.g. a model being trained here: the only copy
    aged(node.model_dir(unpublished), 3600)
    aged(node.model_dir(first), 1800)
    aged(node.model_dir(second), 900)
    node.ensure_local("models", third)
    left = {p.name for p in (node.root / "models").iterdir()}
    # `unpublished` is the oldest but the only copy: `first` went instead, and that was enough.
    assert left == {second, third, unpublished}
    node.touch("models", second)  # in use now (a job's heartbeat does this for its dataset)
    node.ensure_local("models", fourth)
    left = {p.name for p in (node.root / "models").iterdir()}
    assert left == {second, third, fourth, unpublished}  # nothing idle and published to evict
    aged(node.model_dir(third), 600)
    node.discard("models", fourth)
    node.ensure_local("models", first)  # fetched again: evicts the idle, published `third`
    assert {p.name for p in (node.root / "models").iterdir()} == {first, second, unpublished}


def test_the_local_store_never_evicts(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "root", cache_max_bytes=1, cache_min_idle_seconds=0)
    ids = [new_id("mdl") for _ in range(2)]
    for model_id in ids:
        make_folder(storage.model_dir(model_id))
        aged(storage.model_dir(model_id), 3600)
        storage.ensure_local("models", model_id)
    assert {p.name for p in (storage.root / "models").iterdir()} == set(ids)


def test_a_big_file_goes_up_in_parts_and_comes_back_verified(
    store: S3Store, tmp_path: Path
) -> None:
    parted = S3Store(store.bucket, "parts", multipart_bytes=5 * 1024 * 1024)
    source = tmp_path / "big"
    source.mkdir()
    (source / "model.safetensors").write_bytes(os.urandom(11 * 1024 * 1024 + 7))
    parted.publish("models/big", source)
    head = s3().head_object(Bucket=store.bucket, Key="parts/models/big/model.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of three parts
    parted.fetch("models/big", tmp_path / "copy")
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (
        source / "model.safetensors"
    ).read_bytes()
