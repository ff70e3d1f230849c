"""Scaffolding of the bitserve_client protocol tests (test_client_retries.py,
test_client_waiting.py): a tiny scripted http.server on loopback (`Scripted`, its `Reply`s and
the `Seen` requests), the error body bitserve answers, a URL nothing listens on, and the autouse
fixture that keeps this machine's API key out (import it into each test module).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _no_ambient_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The client reads BITSERVE_API_KEY or $BITSERVE_HOME/admin.key when given no key: keep
    # whatever this machine has out of these tests.
    monkeypatch.delenv("BITSERVE_API_KEY", raising=False)
    monkeypatch.setenv("BITSERVE_HOME", str(tmp_path / "no-home"))


@dataclass
class Reply:
    status: int
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Scripted:
    """A loopback HTTP server answering each (method, path) from a script; the last reply of a
    script repeats. Records every request."""

    def __init__(self, script: dict[tuple[str, str], list[Reply]]) -> None:
        self.script = script
        self.seen: list[Seen] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                body = self._body()
                outer.seen.append(
                    Seen(
                        self.command,
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                    )
                )
                replies = outer.script.get((self.command, self.path.split("?")[0]))
                if not replies:
                    reply = Reply(404, _error("not_found", "no"))
                else:
                    reply = replies.pop(0) if len(replies) > 1 else replies[0]
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(reply.body)
                self.close_connection = True

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            return data
                        data += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Scripted:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _error(code: str, message: str = "busy", details: dict[str, Any] | None = None) -> bytes:
    return json.dumps(
        {"error": {"code": code, "message": message, "details": details or {}}}
    ).encode()


QUEUED = {"phase": "queued", "done": None, "total": None}
PROCESSING = {"id": "ds_x", "name": "x", "status": "processing", "progress": QUEUED}


def _closed_url() -> str:
    import socket

    with socket.socket() as sock:  # a port with nothing listening once it is closed
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


NOT_ANSWERING = (
    "the bitserve server at {} is not answering; start it with `bitserve up` (or "
    "`docker compose up`), or point BITSERVE_URL / --url at a running one"
)
