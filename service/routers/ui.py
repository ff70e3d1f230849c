"""The small web page: GET / and its static files under /ui/ (service/static, no build step),
and the API's reference at /docs: Swagger UI from the installed swagger-ui-py package, not
from a CDN (FastAPI's own /docs loads it from cdn.jsdelivr.net: an outside host that sees every
visit and whose script runs with the key typed into "Authorize").

Only the files listed in STATIC are served (no path from the URL ever reaches the file
system; the vendored uPlot under vendor/ included), each with its type, and a Content-Security-Policy allowing nothing but this origin:
the page loads no external assets and talks only to this server's API.
"""

from __future__ import annotations

import importlib.util
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
    "docs.html": "text/html; charset=utf-8",
    "docs.js": "text/javascript; charset=utf-8",
    "curves.js": "text/javascript; charset=utf-8",
    "quality.js": "text/javascript; charset=utf-8",
    "deployments.js": "text/javascript; charset=utf-8",
    # uPlot, copied from its npm package (vendor/uplot/README.md): no CDN.
    "vendor/uplot/uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "vendor/uplot/uPlot.min.css": "text/css; charset=utf-8",
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


def swagger_ui_dir() -> Path:
    """The static folder of the swagger-ui-py package (Swagger UI 5: it reads OpenAPI 3.1,
    which FastAPI writes), found without importing the package's own code."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is not installed (pip install swagger-ui-py)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


SWAGGER_DIR = swagger_ui_dir()
SWAGGER_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
DOCS_HEADERS = {
    **SECURITY_HEADERS,
    # Swagger UI sets style attributes and draws its icons as data: images.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
}


@cache
def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


@cache
def _read_swagger(name: str) -> bytes:
    return (SWAGGER_DIR / name).read_bytes()


def _file(name: str) -> Response:
    media_type = STATIC.get(name)
    if media_type is None:
        raise NotFound("file", name)
    return Response(_read(name), media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/")
def index() -> Response:
    return _file("index.html")


@router.get("/ui/{name:path}")
def static_file(name: str) -> Response:
    # A path, for the vendored files; still only a key of STATIC, never a file-system path.
    return _file(name)


@router.get("/docs")
def docs() -> Response:
    """Swagger UI for /openapi.json; every file it loads comes from this server."""
    return Response(_read("docs.html"), media_type=STATIC["docs.html"], headers=DOCS_HEADERS)


@router.get("/docs/{name}")
def docs_file(name: str) -> Response:
    if name == "docs.js":
        return Response(_read(name), media_type=STATIC[name], headers=DOCS_HEADERS)
    media_type = SWAGGER_FILES.get(name)
    if media_type is None:
        raise NotFound("file", name)
    return Response(_read_swagger(name), media_type=media_type, headers=DOCS_HEADERS)
