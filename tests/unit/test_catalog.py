"""The checkpoint catalog and its downloader, against a real loopback HTTP server."""

from __future__ import annotations

import io
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from bitcore import catalog, cli
from bitcore.catalog import (
    CATALOG,
    CatalogError,
    CheckpointDownloadError,
    CheckpointHTTPError,
    CheckpointMissing,
    CheckpointNetworkError,
    UnknownCheckpoint,
    checkpoint_dir,
    is_present,
    local_path,
    pull,
)
from bitcore.models import count_parameters
from tests.npz_fixtures import official_arrays

NAME = "BiT-S-R50x1"


@dataclass
class FileServer:
    """Serves `files` under /bit_models/, honouring Range; `mode` injects server faults."""

    files: dict[str, bytes]
    mode: str = "normal"  # normal | slow | short | bad-total | ignore-range | error
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    url: str = ""


def _handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            state.requests.append((self.path, rng))
            if state.mode == "slow":
                time.sleep(0.3)
            body = state.files.get(self.path.removeprefix("/bit_models/"))
            if body is None or state.mode == "error":
                self.send_error(404 if body is None else 500)
                return
            start = 0
            if rng and state.mode != "ignore-range":
                start = int(rng.removeprefix("bytes=").rstrip("-"))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                total = len(body) - 10 if state.mode == "bad-total" else len(body)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{total}")
            else:
                self.send_response(200)
            payload = body[start:]
            announced = len(payload) + 1000 if state.mode == "short" else len(payload)
            self.send_header("Content-Length", str(announced))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)

    return Handler


@pytest.fixture(scope="module")
def content() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **official_arrays(num_classes=3, seed=3))  # type: ignore[arg-type]
    return buffer.getvalue()


@pytest.fixture
def server(content: bytes, monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    monkeypatch.setenv("no_proxy", "*")  # loopback must not go through a configured proxy
    # A plain-http test mirror, explicitly allowed (https is tested in test_catalog_integrity).
    monkeypatch.setenv(catalog.INSECURE_ENV, "1")
    monkeypatch.setattr(catalog, "CHUNK", 64 * 1024)  # several chunks from a small file
    state = FileServer(files={f"{NAME}.npz": content, "BiT-M-R50x1.npz": b"not an npz at all"})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/bit_models"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_full_download(server: FileServer, content: bytes, tmp_path: Path):
    seen: list[tuple[int, int | None]] = []
    path = pull(NAME, tmp_path, base_url=server.url, progress=lambda d, t: seen.append((d, t)))
    assert path == tmp_path / f"{NAME}.npz"
    assert path.read_bytes() == content
    assert server.requests == [(f"/bit_models/{NAME}.npz", None)]
    assert seen[0] == (0, len(content)) and seen[-1] == (len(content), len(content))
    assert len(seen) > 3 and all(a[0] < b[0] for a, b in itertools.pairwise(seen))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{NAME}.npz",
        f"{NAME}.npz.lock",
        f"{NAME}.npz.sha256",  # its digest, checked on every later use
    ]
    assert path.stat().st_mode & 0o777 == 0o600  # bitcore.atomic.FILE_MODE
    assert is_present(NAME, tmp_path)


def test_resume_uses_range(server: FileServer, content: bytes, tmp_path: Path):
    (tmp_path / f"{NAME}.npz.part").write_bytes(content[:100_000])
    seen: list[tuple[int, int | None]] = []
    path = pull(NAME, tmp_path, base_url=server.url, progress=lambda d, t: seen.append((d, t)))
    assert server.requests == [(f"/bit_models/{NAME}.npz", "bytes=100000-")]
    assert path.read_bytes() == content
    assert seen[0] == (100_000, len(content))
    assert not (tmp_path / f"{NAME}.npz.part").exists()


def test_concurrent_pulls_download_once(server: FileServer, content: bytes, tmp_path: Path):
    server.mode = "slow"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(pull(NAME, tmp_path, base_url=server.url)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [tmp_path / f"{NAME}.npz"] * 2
    assert len(server.requests) == 1  # the second waited on the lock, then found the file
    assert results[0].read_bytes() == content


def test_server_ignoring_range_restarts(server: FileServer, content: bytes, tmp_path: Path):
    server.mode = "ignore-range"
    (tmp_path / f"{NAME}.npz.part").write_bytes(b"x" * 5000)  # stale bytes must be discarded
    assert pull(NAME, tmp_path, base_url=server.url).read_bytes() == content


def test_complete_part_is_finished_on_416(server: FileServer, content: bytes, tmp_path: Path):
    (tmp_path / f"{NAME}.npz.part").write_bytes(content)
    assert pull(NAME, tmp_path, base_url=server.url).read_bytes() == content
    assert server.requests == [(f"/bit_models/{NAME}.npz", f"bytes={len(content)}-")]


def test_truncated_transfer_keeps_part_for_resume(
    server: FileServer, content: bytes, tmp_path: Path
):
    server.mode = "short"  # announces 1000 bytes more than it sends, then closes
    with pytest.raises(CheckpointNetworkError, match=f"closed after {len(content)} of"):
        pull(NAME, tmp_path, base_url=server.url)
    assert not (tmp_path / f"{NAME}.npz").exists()
    assert (tmp_path / f"{NAME}.npz.part").read_bytes() == content
    server.mode = "normal"  # the next pull completes it with a Range request (416: complete)
    assert pull(NAME, tmp_path, base_url=server.url).read_bytes() == content


def test_size_mismatch_leaves_no_file(server: FileServer, content: bytes, tmp_path: Path):
    server.mode = "bad-total"  # a resumed transfer overshoots the total the server announced
    (tmp_path / f"{NAME}.npz.part").write_bytes(content[:1000])
    with pytest.raises(
        CheckpointDownloadError,
        match=f"have {len(content)} bytes, more than the {len(content) - 10}",
    ):
        pull(NAME, tmp_path, base_url=server.url)
    assert not (tmp_path / f"{NAME}.npz").exists()
    assert not (tmp_path / f"{NAME}.npz.part").exists()


def test_not_an_npz_is_removed(server: FileServer, tmp_path: Path):
    with pytest.raises(CheckpointDownloadError, match=r"not an \.npz file"):
        pull("BiT-M-R50x1", tmp_path, base_url=server.url)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BiT-M-R50x1.npz.lock"]


def test_npy_is_not_an_npz(server: FileServer, tmp_path: Path):
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3, dtype=np.float32))
    server.files["BiT-S-R50x1.npz"] = buffer.getvalue()
    with pytest.raises(CheckpointDownloadError, match=r"not an \.npz file \(not a zip archive\)"):
        pull("BiT-S-R50x1", tmp_path, base_url=server.url)
    assert not (tmp_path / "BiT-S-R50x1.npz.part").exists()


def test_http_error_is_distinguished(server: FileServer, tmp_path: Path):
    with pytest.raises(CheckpointHTTPError, match="HTTP 404") as info:
        pull("BiT-S-R101x1", tmp_path, base_url=server.url)
    assert info.value.status == 404
    server.mode = "error"
    with pytest.raises(CheckpointHTTPError, match="HTTP 500"):
        pull(NAME, tmp_path, base_url=server.url)
    assert not is_present(NAME, tmp_path)


def test_network_failure_is_distinguished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("no_proxy", "*")
    with pytest.raises(CheckpointNetworkError, match="network failure") as info:
        pull(  # the discard port: nothing answers
            NAME, tmp_path, base_url="http://127.0.0.1:9/bit_models", timeout=5, allow_insecure=True
        )
    assert str(tmp_path / f"{NAME}.npz") in str(info.value)  # says where to put it by hand


def test_already_present_makes_no_request(server: FileServer, tmp_path: Path):
    (tmp_path / f"{NAME}.npz").write_bytes(b"anything")
    assert pull(NAME, tmp_path, base_url=server.url) == tmp_path / f"{NAME}.npz"
    assert server.requests == []


def test_unknown_name_is_refused(server: FileServer, tmp_path: Path):
    for name in ("BiT-X-R50x1", "../../etc/passwd", "http://evil.example/x"):
        with pytest.raises(UnknownCheckpoint, match="the catalog has: BiT-S-R50x1, BiT-M-R50x1"):
            pull(name, tmp_path, base_url=server.url)
    assert server.requests == []
    assert list(tmp_path.iterdir()) == []


def test_downloads_disabled_says_what_to_put_where(tmp_path: Path, server: FileServer):
    with pytest.raises(CheckpointMissing) as info:
        pull(NAME, tmp_path / "ckpt", allow_download=False, base_url=server.url)
    message = str(info.value)
    assert f"save it as {NAME}.npz in the directory {tmp_path / 'ckpt'}" in message
    assert f"{server.url}/{NAME}.npz" in message
    assert server.requests == []


def test_environment_configures_directory_and_mirror(
    server: FileServer, content: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("BITSERVE_CHECKPOINT_DIR", str(tmp_path / "env-dir"))
    monkeypatch.setenv("BITSERVE_CHECKPOINT_BASE_URL", server.url + "/")
    assert checkpoint_dir() == tmp_path / "env-dir"
    assert local_path(NAME) == tmp_path / "env-dir" / f"{NAME}.npz"
    assert pull(NAME).read_bytes() == content
    monkeypatch.delenv("BITSERVE_CHECKPOINT_DIR")
    monkeypatch.delenv("BITSERVE_CHECKPOINT_BASE_URL")
    assert checkpoint_dir() == Path.home() / ".cache" / "bitserve" / "checkpoints"
    assert CATALOG[NAME].url() == f"https://storage.googleapis.com/bit_models/{NAME}.npz"


@pytest.mark.parametrize("base", ["file:///etc", "ftp://mirror/bit", "mirror/bit"])
def test_base_url_must_be_http(base: str, tmp_path: Path):
    with pytest.raises(ValueError, match="must be http"):
        pull(NAME, tmp_path, base_url=base)


def test_catalog_contents():
    sizes = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")
    expected = {f"BiT-{f}-{s}" for f in "SM" for s in sizes} | {
        f"BiT-M-{s}-ILSVRC2012" for s in sizes
    }
    assert set(CATALOG) == expected
    assert CATALOG["BiT-M-R152x4"].num_classes == 21843
    assert CATALOG["BiT-S-R152x4"].num_classes == 1000
    assert CATALOG["BiT-M-R101x3-ILSVRC2012"].num_classes == 1000
    assert CATALOG["BiT-M-R101x3-ILSVRC2012"].model_name == "BiT-M-R101x3"
    assert CATALOG["BiT-M-R50x1"].upstream == "ImageNet-21k"
    # docs/bit.md: BiT-M-R50x1 ~260 MiB (21k head), BiT-S-R50x1 ~98 MiB.
    assert round(CATALOG["BiT-M-R50x1"].approx_bytes / 2**20) == 260
    assert round(CATALOG["BiT-S-R50x1"].approx_bytes / 2**20) == 97
    assert CATALOG["BiT-S-R50x3"].parameters == count_parameters("BiT-S-R50x3")
    assert CATALOG["BiT-S-R50x3"].size_bytes == 4 * count_parameters("BiT-S-R50x3")


def test_every_error_is_a_catalog_error():
    for error in (UnknownCheckpoint, CheckpointMissing, CheckpointDownloadError):
        assert issubclass(error, CatalogError)
    assert issubclass(CheckpointNetworkError, CheckpointDownloadError)
    assert issubclass(CheckpointHTTPError, CheckpointDownloadError)
    assert issubclass(UnknownCheckpoint, ValueError)  # bad input, for callers mapping to 4xx
    assert issubclass(CheckpointMissing, FileNotFoundError)


def test_bitcore_cli_lists_and_pulls(
    server: FileServer, content: bytes, tmp_path: Path, monkeypatch, capsys
):
    """`python -m bitcore checkpoints`: --dir, several names in one pull, the present marks."""
    monkeypatch.setenv("BITSERVE_CHECKPOINT_BASE_URL", server.url)
    server.files["BiT-S-R101x1.npz"] = content
    assert cli.main(["checkpoints", "pull", "--dir", str(tmp_path), NAME, "BiT-S-R101x1"]) == 0
    assert (tmp_path / f"{NAME}.npz").read_bytes() == content
    assert (tmp_path / "BiT-S-R101x1.npz").read_bytes() == content
    assert capsys.readouterr().out.splitlines() == [
        str(tmp_path / f"{NAME}.npz"),
        str(tmp_path / "BiT-S-R101x1.npz"),
    ]
    assert cli.main(["checkpoints", "list", "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"checkpoint directory: {tmp_path}"
    assert f"{NAME}                 97 MiB  yes      ImageNet-1k (ILSVRC-2012)" in lines
    assert "BiT-M-R50x1                260 MiB  no       ImageNet-21k" in lines
    # A failed pull is a user error of the bitcore CLI: one line on stderr, exit status 2.
    assert cli.main(["checkpoints", "pull", "--dir", str(tmp_path), "BiT-nope"]) == 2
    assert capsys.readouterr().err == (
        "error: unknown checkpoint 'BiT-nope'; see `python -m bitcore checkpoints list`\n"
    )
