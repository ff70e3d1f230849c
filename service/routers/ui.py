"""The small web page: GET / and its static files under /ui/ (service/static, no build step).

Only the files listed in STATIC are served (no path from the URL ever reaches the file
system), each with its type, and a Content-Security-Policy allowing nothing but this origin:
the page loads no external assets and talks only to this server's API.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from service.domain_errors import NotFound

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    # blob: for the preview of the image being classified; nothing else leaves this origin.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


def _file(name: str) -> Response:
    media_type = STATIC.get(name)
    if media_type is None:
        raise NotFound("file", name)
    return Response(_read(name), media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/")
def index() -> Response:
    return _file("index.html")


@router.get("/ui/{name}")
def static_file(name: str) -> Response:
    return _file(name)
