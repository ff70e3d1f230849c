"""Upload and ingestion of a 30,000-image dataset (96 px JPEGs) through the real processes.

The finding of issue 12: such a dataset (a 52 MB zip) took 114 s to upload on 2 cores, the
request held open while the gateway extracted, decoded and cached every image, and the gateway
peaked at 19 GB resident. Now the gateway only stores the archive and answers 202; an ingest
worker extracts and validates it; the node that trains builds the training cache.

This runs the product's own commands as separate processes, `bitserve api` and `bitserve worker
--queues ingest`, on the local PostgreSQL (a fresh database) and Redis (private queues), with
auth off, and measures:
- how long the upload request takes to be answered (202), and how fast the body went;
- ingestion: from the 202 to `ready`, in images/s;
- the peak resident memory (VmHWM) of the gateway and of the ingest worker;
- the training cache a node then builds for this dataset (pre-crop and crop, as a job's shared
  cache), in bytes against the upload's bytes and the accepted images' bytes.

    python benchmarks/ingest_speed.py                  # 30,000 images
    python benchmarks/ingest_speed.py --images 3000    # quicker

The archive is generated once and kept under the system temp dir (reused by later runs).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cache_size import make_dataset  # noqa: E402
from bitcore.data import build_cache  # noqa: E402
from bitcore.data.index import DatasetIndex  # noqa: E402
from bitcore.hyperrule import plan as hyperrule_plan  # noqa: E402
from tests.imagegen import make_archive  # noqa: E402
from tests.services import PrivateServers, create_database, drop_database, find_postgres, find_redis  # noqa: E402  # noqa: E402

STARTUP_TIMEOUT_S = 90.0
INGEST_TIMEOUT_S = 1800.0


def archive_for(images: int, side: int) -> tuple[Path, int]:
    """The dataset's zip (generated on the first run), and its images' bytes."""
    cache = Path(tempfile.gettempdir()) / f"bitserve-bench-ingest-{images}-{side}"
    archive = cache / "images.zip"
    marker = cache / "image-bytes.txt"
    if not archive.is_file() or not marker.is_file():
        started = time.perf_counter()
        folder = cache / "images"
        image_bytes = make_dataset(folder, images, side)
        made = make_archive(folder, "zip")
        os.replace(made, archive)
        marker.write_text(str(image_bytes))
        print(f"generated {images} images in {time.perf_counter() - started:.0f} s", flush=True)
    return archive, int(marker.read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set so far (kB in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_until(check: object, what: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise SystemExit(f"{what} did not start in {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def multipart(archive: Path, boundary: str) -> tuple[int, object]:
    """The body streamed from disk (as a client would), and its length."""
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="images.zip"'
        f"\r\nContent-Type: application/zip\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> object:
        yield head
        with open(archive, "rb") as handle:
            while block := handle.read(1 << 20):
                yield block
        yield tail

    return len(head) + archive.stat().st_size + len(tail), chunks()


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=30_000)
    parser.add_argument("--side", type=int, default=96)
    args = parser.parse_args()
    archive, image_bytes = archive_for(args.images, args.side)
    upload_bytes = archive.stat().st_size

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        private = PrivateServers()
        stack.callback(private.close)
        admin_url = find_postgres(private)
        database_url, database = create_database(admin_url)
        stack.callback(drop_database, admin_url, database)
        home, port, tag = Path(tmp) / "home", free_port(), uuid.uuid4().hex[:8]
        env = {
            **os.environ,
            "BITSERVE_HOME": str(home),
            "BITSERVE_DATABASE_URL": database_url,
            "BITSERVE_BROKER_URL": find_redis(private),
            "BITSERVE_AUTH": "off",
            "BITSERVE_PORT": str(port),
            "BITSERVE_TRAIN_QUEUE": f"train-bench-{tag}",
            "BITSERVE_INGEST_QUEUE": f"ingest-bench-{tag}",
            "BITSERVE_LOG_FORMAT": "text",
        }
        bitserve = [sys.executable, "-m", "service.cli"]
        subprocess.run([*bitserve, "migrate"], cwd=ROOT, env=env, check=True, capture_output=True)
        api_log, worker_log = Path(tmp) / "api.log", Path(tmp) / "worker.log"
        api = start([*bitserve, "api"], env, api_log)
        stack.callback(stop, api)
        worker = start([*bitserve, "worker", "--queues", "ingest"], env, worker_log)
        stack.callback(stop, worker)
        base = f"http://127.0.0.1:{port}"

        def api_up() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(api_up, "bitserve api", api_log)
        wait_until(lambda: "ready." in worker_log.read_text(), "bitserve worker", worker_log)

        boundary = f"bench-{tag}"
        length, body = multipart(archive, boundary)
        headers = {
            "content-type": f"multipart/form-data; boundary={boundary}",
            "content-length": str(length),
        }
        with httpx.Client(base_url=base, timeout=600) as http:
            began = time.perf_counter()
            answer = http.post("/v1/datasets", content=body, headers=headers)  # type: ignore[arg-type]
            answered_s = time.perf_counter() - began
            if answer.status_code != 202:
                raise SystemExit(f"upload answered {answer.status_code}: {answer.text}")
            dataset_id = answer.json()["id"]
            while True:
                dataset = http.get(f"/v1/datasets/{dataset_id}").json()
                if dataset["status"] != "processing":
                    break
                if time.perf_counter() - began > INGEST_TIMEOUT_S:
                    raise SystemExit(f"still processing after {INGEST_TIMEOUT_S} s")
                time.sleep(0.25)
            ingest_s = time.perf_counter() - began - answered_s
        if dataset["status"] != "ready":
            raise SystemExit(f"ingestion failed: {dataset['error']}\n{worker_log.read_text()}")
        api_rss, worker_rss = peak_rss_mb(api.pid), peak_rss_mb(worker.pid)

        # What the node that trains builds, into the dataset's shared cache folder.
        directory = home / "store" / "datasets" / dataset_id
        index = DatasetIndex.load(directory / "index.json")
        plan = hyperrule_plan(index.num_images, index.median_size)
        began = time.perf_counter()
        for size in (plan.precrop, plan.crop):
            build_cache(index, size, directory / "cache")
        cache_s = time.perf_counter() - began
        cache_bytes = folder_bytes(directory / "cache")
        files_bytes = folder_bytes(directory / "files")

    rows = [
        ("images", f"{dataset['num_images']:,} ({dataset['num_classes']} classes, {args.side} px)"),
        ("upload (zip)", f"{upload_bytes / 1e6:.1f} MB"),
        (
            "upload answered (202)",
            f"{answered_s:.2f} s ({upload_bytes / 1e6 / answered_s:.0f} MB/s)",
        ),
        ("ingestion (202 -> ready)", f"{ingest_s:.1f} s"),
        ("ingestion throughput", f"{dataset['num_images'] / ingest_s:,.0f} images/s"),
        ("gateway peak RSS", f"{api_rss:,.0f} MB"),
        ("ingest worker peak RSS", f"{worker_rss:,.0f} MB"),
        (
            f"training cache ({plan.precrop} + {plan.crop} px)",
            f"{cache_bytes / 1e6:.1f} MB, built in {cache_s:.1f} s",
        ),
        ("cache / upload bytes", f"{cache_bytes / upload_bytes:.2f}x"),
        ("cache / accepted images' bytes", f"{cache_bytes / files_bytes:.2f}x"),
    ]
    print(f"\n{platform.node()} ({os.cpu_count()} CPUs), Python {platform.python_version()}")
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    print(f"(generated images: {image_bytes / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
