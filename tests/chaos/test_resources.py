"""Resource faults against a real API server and a real Celery worker: a full disk, a worker
out of memory, a damaged model artifact. Each fault stays with the request or job that met it.

The store is a size-limited tmpfs mounted by the test (we run as root in CI); where mounting is
not permitted, the disk tests skip and tests/unit/test_resource_faults.py proves the same
behaviour with an injected ENOSPC. The worker's memory limit is RLIMIT_AS, set on the running
worker (resource.prlimit) above the peak it reached on a normal job, so a job that needs far more
fails its allocation instead of being killed.

Durations are printed (run with -s) for the failure table in docs/operations.md.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from bitcore.models import create_model
from service.api_keys import Scope
from service.db import Database
from service.storage import Storage
from tests.imagegen import make_archive
from tests.integration.conftest import LiveServer, make_key
from tests.integration.datasets_helpers import upload_ready, wait_dataset
from tests.integration.worker_fixtures import FAST_OVERRIDES, WorkerProcess, fast_job_settings
from tests.model_fixtures import publish_model

pytestmark = [pytest.mark.timeout(300)]

STORE_MIB = 64
JOB_TIMEOUT_S = 120.0  # a FAST job takes seconds; a loaded 2-core CI machine, much longer
MEMORY_MARGIN_BYTES = 1 << 30  # the OOM job needs several GiB more than a normal one


@dataclass
class Env:
    server: LiveServer
    worker: WorkerProcess
    storage: Storage
    http: httpx.Client
    tenant: str
    mounted: bool

    def post_job(self, dataset_id: str, **overrides: Any) -> dict[str, Any]:
        body = {
            "dataset_id": dataset_id,
            "base_model": "tiny-R10x0.25",
            "validation_fraction": 0.25,
            "overrides": {**FAST_OVERRIDES, **overrides},
        }
        response = self.http.post("/v1/jobs", json=body)
        assert response.status_code in (201, 202), response.text
        job: dict[str, Any] = response.json()
        return job

    def wait_job(self, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.2)
        raise AssertionError(
            f"job {job_id} not finished in {timeout} s\n{self.worker.log()[-3000:]}"
        )

    def upload(self, archive: Path, *, chunked: bool = False) -> httpx.Response:
        files = {"file": (archive.name, archive.read_bytes(), "application/zip")}
        if not chunked:
            return self.http.post("/v1/datasets", files=files)
        # No Content-Length (chunked): the server learns the size only as the body streams.
        request = self.http.build_request("POST", "/v1/datasets", files=files)
        body = request.read()
        return self.http.post(
            "/v1/datasets",
            content=iter([body]),
            headers={"Content-Type": request.headers["Content-Type"]},
        )

    def stored_bytes(self) -> int:
        admin = {"Authorization": f"Bearer {self.server.key}"}  # quotas are an admin route
        quotas = self.http.get(f"/v1/tenants/{self.tenant}/quotas", headers=admin).json()
        return int(quotas["usage"]["stored_bytes"])


def _mount_tmpfs(path: Path, mib: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, migrated_db: str, redis_url: str
) -> Iterator[Env]:
    home = tmp_path_factory.mktemp("resources")
    store = home / "store"
    mounted = _mount_tmpfs(store, STORE_MIB)
    settings = fast_job_settings(
        home,
        database_url=migrated_db,
        broker_url=redis_url,
        artifact_root=store,
        job_stale_after_seconds=60.0,  # a slow step on a loaded machine is not a lost worker
        min_images_per_class=2,
        # The disk fills while the body is written or unpacked, not at the free-space check
        # made before reading it (tests/integration/test_abuse_uploads.py tests that one).
        upload_free_disk_margin_bytes=0,
    )
    server = LiveServer(settings).start()
    tenant = f"res-{uuid.uuid4().hex[:8]}"
    key = make_key(server.app.state.db, settings, tenant, (Scope.TRAIN, Scope.PREDICT))
    try:
        with (
            WorkerProcess(settings, pool="solo") as worker,
            httpx.Client(
                base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {key}"}
            ) as http,
        ):
            http.get("/healthz").raise_for_status()
            environment = Env(server, worker, Storage(store), http, tenant, mounted)
            yield environment
    finally:
        server.stop()
        if mounted:
            subprocess.run(["umount", "-l", str(store)], check=False)


def _noise_archive(folder: Path, images_per_class: int, side: int = 96) -> Path:
    """Random-noise PNGs: they hardly compress, so the archive's size is about its contents'."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
    return make_archive(folder)


def _fill(store: Path, leave_bytes: int) -> Path:
    """A file taking all the store's space but `leave_bytes`."""
    stat = os.statvfs(store)
    free = stat.f_bavail * stat.f_frsize
    filler = store / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(1, free - leave_bytes))
    finally:
        os.close(fd)
    return filler


def _leftovers(storage: Storage) -> list[str]:
    """Files the store should not hold after a failure: temp and stored uploads, half
    datasets/models."""
    found = []
    for kind in ("tmp", "uploads", "datasets", "models", "jobs"):
        folder = storage.root / kind
        if folder.is_dir():
            found += [p.relative_to(storage.root).as_posix() for p in folder.iterdir()]
    return found


def _need_tmpfs(env: Env) -> None:
    # As root (CI, containers) the mount must work: a failure there is a failure, not a skip.
    # Unprivileged developers get a visible skip; tests/unit/test_resource_faults.py injects
    # ENOSPC and proves the same behaviour without a mount.
    if not env.mounted:
        message = "mount -t tmpfs failed; the disk-full chaos tests need root (as in CI)"
        if os.geteuid() == 0:
            pytest.fail(message)
        pytest.skip(message + ": see tests/unit/test_resource_faults.py")


def test_an_upload_to_a_full_disk_is_507_and_leaves_nothing(env: Env, tmp_path: Path) -> None:
    _need_tmpfs(env)
    archive = _noise_archive(tmp_path / "noise", images_per_class=8)  # ~450 KB
    size = archive.stat().st_size
    before = env.stored_bytes()
    baseline = set(_leftovers(env.storage))
    # The gateway, receiving the body, answers these itself:
    # 1. No room for the upload, its size declared: refused before a byte is read.
    # 2. No room for the upload, sent chunked (size unknown): refused while it streams.
    cases = (
        ("checking", size // 3, False, "too little free disk"),
        ("receiving", size // 3, True, "disk is full"),
    )
    for where, leave, chunked, message in cases:
        filler = _fill(env.storage.root, leave)
        try:
            started = time.perf_counter()
            response = env.upload(archive, chunked=chunked)
            took = time.perf_counter() - started
        finally:
            filler.unlink()
        print(f"\n[resources] full disk while {where} an upload: 507 in {took:.2f} s")
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert error["code"] == "insufficient_storage"
        assert message in error["message"]
        assert set(_leftovers(env.storage)) == baseline, where
        assert env.http.get("/v1/datasets").json()["items"] == []
        assert env.stored_bytes() == before
    # 3. Room for the upload (stored by a rename on the same disk), not for unpacking it next
    # to it: the gateway answers 202, the ingest worker meets the full disk, and the dataset
    # ends failed with the same error the synchronous upload answered; nothing of it is kept.
    filler = _fill(env.storage.root, size + size // 2)
    try:
        started = time.perf_counter()
        response = env.upload(archive)
        assert response.status_code == 202, response.text
        failed = wait_dataset(env.http, response.json()["id"])
        took = time.perf_counter() - started
    finally:
        filler.unlink()
    print(f"[resources] full disk while unpacking an upload: failed in {took:.2f} s after POST")
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "insufficient_storage", failed["error"]
    assert "disk is full" in failed["error"]["message"]
    assert failed["error"]["details"] == {}
    assert failed["progress"] is None and failed["num_images"] == 0
    assert set(_leftovers(env.storage)) == baseline, "unpacking"
    assert not (env.storage.root / "uploads" / failed["id"]).exists()
    assert [d["id"] for d in env.http.get("/v1/datasets").json()["items"]] == [failed["id"]]
    assert env.stored_bytes() == before  # a failed dataset stores nothing
    assert env.http.delete(f"/v1/datasets/{failed['id']}").status_code == 204
    # Space again: the same upload works at once.
    ready = upload_ready(env.http, archive, filename=archive.name)
    assert env.stored_bytes() == before + size
    assert env.http.delete(f"/v1/datasets/{ready['id']}").status_code == 204
    assert set(_leftovers(env.storage)) == baseline


def _dataset(env: Env, tmp_path: Path) -> str:
    archive = _noise_archive(tmp_path / "small", images_per_class=4, side=48)
    dataset_id: str = upload_ready(env.http, archive, filename=archive.name)["id"]
    return dataset_id


def test_a_job_that_fills_the_disk_fails_and_registers_nothing(env: Env, tmp_path: Path) -> None:
    _need_tmpfs(env)
    dataset_id = _dataset(env, tmp_path)
    models_before = env.http.get("/v1/models").json()["items"]
    before = env.stored_bytes()
    filler = _fill(env.storage.root, 16 * 1024)
    try:
        started = time.perf_counter()
        job = env.wait_job(env.post_job(dataset_id)["id"])
        took = time.perf_counter() - started
    finally:
        filler.unlink()
    print(f"\n[resources] full disk in a training job: failed in {took:.2f} s after POST")
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "insufficient_storage", job["error"]
    assert env.http.get("/v1/models").json()["items"] == models_before
    assert env.stored_bytes() == before
    assert not (env.storage.root / "jobs" / job["id"]).exists()
    assert list((env.storage.root / "models").glob("*")) == []
    # The same worker takes the next job once there is room again.
    pid = env.worker.proc.pid if env.worker.proc else None
    again = env.wait_job(env.post_job(dataset_id)["id"])
    assert again["status"] == "succeeded", again
    assert env.worker.proc is not None and env.worker.proc.pid == pid
    assert env.worker.proc.poll() is None


def _vm_peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmPeak")


def test_a_job_out_of_memory_fails_with_advice_and_the_worker_goes_on(
    env: Env, tmp_path: Path
) -> None:
    assert env.worker.proc is not None
    pid = env.worker.proc.pid  # the solo pool runs jobs in this very process
    dataset_id = _dataset(env, tmp_path)
    normal = env.wait_job(env.post_job(dataset_id)["id"])
    assert normal["status"] == "succeeded", normal
    peak = _vm_peak(pid)
    limit = peak + MEMORY_MARGIN_BYTES
    # The soft limit only: lowering the hard one could not be undone without CAP_SYS_RESOURCE.
    old = resource.prlimit(pid, resource.RLIMIT_AS)
    resource.prlimit(pid, resource.RLIMIT_AS, (limit, old[1]))
    print(
        f"\n[resources] worker VmPeak after a normal job {peak / 2**20:.0f} MiB; "
        f"RLIMIT_AS set to {limit / 2**20:.0f} MiB"
    )
    try:
        # 64 images of 448 px through the network at once: several GiB of activations.
        big = {"batch_size": 64, "micro_batch_size": 64, "crop": 448, "precrop": 480}
        started = time.perf_counter()
        failed = env.wait_job(env.post_job(dataset_id, **big)["id"])
        took = time.perf_counter() - started
        print(f"[resources] out-of-memory job: failed in {took:.2f} s after POST")
        assert failed["status"] == "failed", failed
        assert failed["error"]["code"] == "out_of_memory", failed["error"]
        message = failed["error"]["message"]
        assert "micro_batch_size 64" in message and '"micro_batch_size": 32' in message
        assert env.http.get("/readyz").status_code == 200
        # The worker is alive, under the same limit, and its next job succeeds.
        assert env.worker.proc.poll() is None
        after = env.wait_job(env.post_job(dataset_id)["id"])
        assert after["status"] == "succeeded", after
        assert env.worker.proc.pid == pid and env.worker.proc.poll() is None
    finally:
        resource.prlimit(pid, resource.RLIMIT_AS, old)


@pytest.mark.parametrize("damage", ["truncate", "bit_flip"])
def test_a_damaged_artifact_answers_503_for_that_model_only(env: Env, damage: str) -> None:
    db: Database = env.server.app.state.db
    ids = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = create_model("tiny-R10x0.25", 2)
        model_id, _ = publish_model(
            db, env.storage, model, "tiny-R10x0.25", ["a", "b"], 32, tenant_id=env.tenant
        )
        ids.append(model_id)
    good, bad = ids
    weights = env.storage.model_dir(bad) / "model.safetensors"
    intact = weights.read_bytes()
    data = bytearray(intact)
    if damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data[-64] ^= 0x10
    weights.write_bytes(bytes(data))
    image = _png()
    for attempt in range(3):
        started = time.perf_counter()
        answer = env.http.post(f"/v1/models/{bad}/predict", files={"files": ("x.png", image)})
        took = time.perf_counter() - started
        if attempt == 0:
            print(f"\n[resources] damaged artifact ({damage}): 503 in {took:.3f} s")
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "model_artifact_corrupt"
        assert answer.headers["Retry-After"] == "60"
        ok = env.http.post(f"/v1/models/{good}/predict", files={"files": ("x.png", image)})
        assert ok.status_code == 200, ok.text
    assert bad not in env.server.app.state.models.loaded
    weights.write_bytes(intact)  # restored: served again without a restart
    again = env.http.post(f"/v1/models/{bad}/predict", files={"files": ("x.png", image)})
    assert again.status_code == 200, again.text


def _png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()
