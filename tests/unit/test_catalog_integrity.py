"""Issue 11, checkpoint integrity: SHA-256 recorded and checked, https only, no downgrade
redirects, a size cap. Real loopback HTTP and HTTPS servers (a throwaway self-signed
certificate, trusted through SSL_CERT_FILE as an operator's private CA would be)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from bitcore import catalog
from bitcore.catalog import (
    CheckpointCorrupt,
    CheckpointRedirectRefused,
    CheckpointTooLarge,
    InsecureMirror,
    pull,
)
from tests.npz_fixtures import official_arrays

NAME = "BiT-S-R50x1"


@dataclass
class Mirror:
    """Serves `files` under /bit_models/; `redirects` maps a path to a Location."""

    files: dict[str, bytes]
    redirects: dict[str, str] = field(default_factory=dict)
    chunked: bool = False  # no Content-Length: the client cannot know the size up front
    requests: list[str] = field(default_factory=list)
    url: str = ""


def _handler(state: Mirror) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            state.requests.append(self.path)
            if self.path in state.redirects:
                self.send_response(302)
                self.send_header("Location", state.redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = state.files.get(self.path.removeprefix("/bit_models/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            if not state.chunked:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)  # a client stopping at its cap hangs up mid-body

    return Handler


def _serve(state: Mirror, scheme: str, context: ssl.SSLContext | None) -> Iterator[Mirror]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    if context is not None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    state.url = f"{scheme}://127.0.0.1:{httpd.server_address[1]}/bit_models"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def content() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **official_arrays(num_classes=3, seed=5))  # type: ignore[arg-type]
    return buffer.getvalue()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl, as an operator would make one)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, certificate: tuple[Path, Path]) -> None:
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # trust the test's certificate
    for name in (catalog.INSECURE_ENV, catalog.MAX_BYTES_ENV, "BITSERVE_CHECKPOINT_SHA256"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(catalog, "CHUNK", 16 * 1024)


@pytest.fixture
def https_mirror(env: None, content: bytes, certificate: tuple[Path, Path]) -> Iterator[Mirror]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    yield from _serve(Mirror(files={f"{NAME}.npz": content}), "https", context)


@pytest.fixture
def http_mirror(env: None, content: bytes) -> Iterator[Mirror]:
    yield from _serve(Mirror(files={f"{NAME}.npz": content}), "http", None)


def test_digest_is_recorded_on_first_download_and_a_tampered_file_is_refused(
    https_mirror: Mirror, content: bytes, tmp_path: Path
) -> None:
    path = pull(NAME, tmp_path, base_url=https_mirror.url)
    digest = hashlib.sha256(content).hexdigest()
    assert (tmp_path / f"{NAME}.npz.sha256").read_text() == f"{digest}  {NAME}.npz\n"
    assert pull(NAME, tmp_path, base_url=https_mirror.url) == path  # checked, still fine

    tampered = bytearray(path.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF  # one flipped byte inside an array
    path.write_bytes(bytes(tampered))
    with pytest.raises(CheckpointCorrupt) as info:
        pull(NAME, tmp_path, base_url=https_mirror.url)
    message = str(info.value)
    assert f"not the {digest} recorded in {NAME}.npz.sha256" in message
    assert hashlib.sha256(tampered).hexdigest() in message
    assert str(tmp_path) not in message  # names the file, not where the server keeps it
    assert https_mirror.requests == [f"/bit_models/{NAME}.npz"]  # no silent re-download
    assert path.read_bytes() == bytes(tampered)  # kept as evidence, not overwritten


def test_a_file_put_in_place_by_hand_is_recorded_on_first_use(
    https_mirror: Mirror, content: bytes, tmp_path: Path
) -> None:
    (tmp_path / f"{NAME}.npz").write_bytes(content)
    pull(NAME, tmp_path, base_url=https_mirror.url)
    assert catalog.checkpoint_digests.recorded(tmp_path / f"{NAME}.npz") == (
        hashlib.sha256(content).hexdigest()
    )
    assert https_mirror.requests == []


def test_a_pinned_digest_mismatch_is_refused_and_nothing_is_kept(
    https_mirror: Mirror, tmp_path: Path
) -> None:
    wrong = "ab" * 32
    with pytest.raises(CheckpointCorrupt, match=f"not the {wrong} pinned for {NAME}"):
        pull(NAME, tmp_path, base_url=https_mirror.url, pins={NAME: wrong})
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{NAME}.npz.lock"]


def test_a_pin_wins_over_the_recorded_digest(
    https_mirror: Mirror, content: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever can rewrite the checkpoint directory can rewrite the sidecar too: the pin (from
    the environment here, as BITSERVE_CHECKPOINT_SHA256) is what cannot be swapped."""
    path = pull(NAME, tmp_path, base_url=https_mirror.url)
    forged = b"PK" + b"\0" * 100
    path.write_bytes(forged)
    catalog.checkpoint_digests.record(path, hashlib.sha256(forged).hexdigest())
    assert pull(NAME, tmp_path, base_url=https_mirror.url) == path  # the record agrees
    good = hashlib.sha256(content).hexdigest()
    monkeypatch.setenv("BITSERVE_CHECKPOINT_SHA256", json.dumps({NAME: good.upper()}))
    with pytest.raises(CheckpointCorrupt, match=f"not the {good} pinned in"):
        pull(NAME, tmp_path, base_url=https_mirror.url)
    path.write_bytes(content)  # the real file back: the pin passes and the record follows it
    assert pull(NAME, tmp_path, base_url=https_mirror.url) == path
    assert catalog.checkpoint_digests.recorded(path) == good


def test_an_http_mirror_is_refused_without_the_setting(
    http_mirror: Mirror, content: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InsecureMirror, match="plain http: use https, or set BITSERVE_ALLOW_"):
        pull(NAME, tmp_path, base_url=http_mirror.url)
    assert http_mirror.requests == []
    assert not (tmp_path / f"{NAME}.npz").exists()
    # The operator's explicit consent, in code or in the environment.
    assert pull(NAME, tmp_path / "a", base_url=http_mirror.url, allow_insecure=True).is_file()
    monkeypatch.setenv(catalog.INSECURE_ENV, "1")
    assert pull(NAME, tmp_path / "b", base_url=http_mirror.url).read_bytes() == content


def test_an_https_to_http_redirect_is_refused(
    https_mirror: Mirror, http_mirror: Mirror, content: bytes, tmp_path: Path
) -> None:
    https_mirror.redirects[f"/bit_models/{NAME}.npz"] = f"{http_mirror.url}/{NAME}.npz"
    for allow_insecure in (False, True):  # a downgrade is refused even where http is allowed
        with pytest.raises(CheckpointRedirectRefused, match="which is not https; refused"):
            pull(NAME, tmp_path, base_url=https_mirror.url, allow_insecure=allow_insecure)
    assert http_mirror.requests == []  # the plain-http URL was never fetched
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{NAME}.npz.lock"]
    # A redirect that stays on https is followed.
    https_mirror.redirects[f"/bit_models/{NAME}.npz"] = f"{https_mirror.url}/moved.npz"
    https_mirror.files["moved.npz"] = content
    assert pull(NAME, tmp_path, base_url=https_mirror.url).read_bytes() == content


def test_a_download_announced_larger_than_the_cap_is_not_read(
    https_mirror: Mirror, content: bytes, tmp_path: Path
) -> None:
    (tmp_path / f"{NAME}.npz.part").write_bytes(b"")  # even an existing .part goes
    with pytest.raises(
        CheckpointTooLarge, match=f"larger than the 1000-byte cap .*: {len(content)}"
    ):
        pull(NAME, tmp_path, base_url=https_mirror.url, max_bytes=1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{NAME}.npz.lock"]


def test_a_download_streaming_past_the_cap_is_aborted_and_removed(
    https_mirror: Mirror, content: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Content-Length: the cap is enforced on the bytes as they arrive."""
    https_mirror.chunked = True
    https_mirror.files[f"{NAME}.npz"] = content * 20  # ~20x the cap below
    cap = len(content)
    monkeypatch.setenv(catalog.MAX_BYTES_ENV, str(cap))
    seen: list[int] = []
    with pytest.raises(CheckpointTooLarge, match=f"larger than the {cap}-byte cap"):
        pull(NAME, tmp_path, base_url=https_mirror.url, progress=lambda d, t: seen.append(d))
    assert max(seen) <= cap + catalog.CHUNK  # stopped within one chunk of the cap
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{NAME}.npz.lock"]


def test_the_default_cap_is_above_the_largest_official_file() -> None:
    largest = max(entry.approx_bytes for entry in catalog.CATALOG.values())
    assert largest == catalog.CATALOG["BiT-M-R152x4"].approx_bytes
    assert 1.2 * largest < catalog.DEFAULT_MAX_BYTES < 2 * largest
