"""What a browser may do to this server: the Host it names, the pages that may change state, and
the headers every answer carries (docs/security.md, "Browsers, names and logs").

The API listens on loopback by default, where any web page the user opens can reach it:

- DNS rebinding: a page at evil.example re-points its name to 127.0.0.1 and then calls the
  API "same-origin", with `Host: evil.example`. Refused: the Host header must name this server
  (the loopback names, BITSERVE_HOST, and BITSERVE_ALLOWED_HOSTS) -> 400 `host_not_allowed`.
- CSRF: a page posts a form (multipart uploads need no CORS preflight) to 127.0.0.1. Refused on
  state-changing methods: an `Origin` other than this server's own (or one listed in
  BITSERVE_ALLOWED_ORIGINS), or `Sec-Fetch-Site: cross-site`/`same-site`, -> 403
  `cross_origin_refused`. Requests with neither header (the CLI, the Python client, curl)
  pass: only browsers send them, and browsers always do on a cross-origin POST.

Every answer gets `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`,
`X-Frame-Options: DENY`, a Content-Security-Policy allowing nothing (unless the route set its
own: the web page and /docs do), and JSON answers `Cache-Control: no-store` (they carry
tenants' data; an answer that set its own caching keeps it). Pure ASGI: streaming answers
(SSE, artifact downloads) pass through untouched but for their headers.
"""

from __future__ import annotations

import logging

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.domain_errors import Forbidden, MalformedRequest
from service.http_errors import domain_error_response
from service.settings import Settings

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Sec-Fetch-Site values of a request this server's own pages (or no page: a typed URL) made.
TRUSTED_FETCH_SITES = frozenset({"same-origin", "none"})
DEFAULT_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    # Answers that are not pages load nothing and may not be framed.
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
)


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """Host names (lower case, no port) the API answers to; None: any ("*" was configured)."""
    extra = [h.strip().lower().rstrip(".") for h in settings.allowed_hosts if h.strip()]
    if "*" in extra:
        return None
    hosts = set(LOOPBACK_HOSTS) | set(extra)
    if settings.host not in WILDCARD_BINDS:
        hosts.add(settings.host.lower().strip("[]"))
    return frozenset(hosts)


def host_name(host_header: str) -> str:
    """'Example.COM:8000' -> 'example.com', '[::1]:8000' -> '::1' (port and brackets gone)."""
    value = host_header.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _origin_netloc(origin: str) -> str | None:
    """'https://Example.com:8443' -> 'example.com:8443'; None for 'null' or no scheme."""
    scheme, sep, rest = origin.strip().partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest:
        return None
    return rest.split("/", 1)[0].lower()


def _host_not_allowed(host: str) -> MalformedRequest:
    return MalformedRequest(
        "host_not_allowed",
        "this server does not answer to that Host name; an operator adds names with "
        "BITSERVE_ALLOWED_HOSTS",
        {"host": host[:255]},
    )


def _cross_origin(why: str) -> Forbidden:
    return Forbidden(
        "cross_origin_refused",
        f"a web page of another origin may not change anything here ({why}); an operator "
        "allows an origin with BITSERVE_ALLOWED_ORIGINS",
    )


class WebSecurityMiddleware:
    """The Host allow-list, the cross-origin refusal, and the security headers (module doc)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.hosts = allowed_hosts(settings)
        self.origins = frozenset(o.strip().lower().rstrip("/") for o in settings.allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        send = _with_security_headers(send)
        if refusal is not None:
            log.warning(
                "refused %s %s: %s", scope["method"], ascii(scope["path"])[:200], refusal.code
            )
            await domain_error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> MalformedRequest | Forbidden | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        # No Host at all (HTTP/1.0 by hand): no browser request, nothing to rebind.
        if host and self.hosts is not None and host_name(host) not in self.hosts:
            return _host_not_allowed(host)
        if scope["method"] not in STATE_CHANGING:
            return None
        origin = headers.get("origin")
        if origin is not None:
            if origin.strip().lower().rstrip("/") in self.origins:
                return None
            netloc = _origin_netloc(origin)
            if netloc is None or not host or netloc != host.strip().lower():
                return _cross_origin(f"Origin {origin[:100]!r}")
            return None
        fetch_site = headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site.lower() not in TRUSTED_FETCH_SITES:
            return _cross_origin(f"Sec-Fetch-Site {fetch_site[:30]!r}")
        return None


def _with_security_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            for name, value in DEFAULT_HEADERS:
                if name.decode() not in headers:
                    headers.raw.append((name, value))
            content_type = headers.get("content-type", "")
            if _is_json(content_type) and "cache-control" not in headers:
                headers.raw.append((b"cache-control", b"no-store"))
        await send(message)

    return wrapped


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")
