"""When the client sends a request again (docs/api.md, "Retries").

A 429, and a 503 `shutting_down` or `too_many_uploads` (refused before any work), are retried
after their Retry-After for every call, an upload (a POST that creates a dataset) included. Other 503 answers and lost connections are retried only for
idempotent calls, since the server may have acted on the first try. A connection that failed
before the request was sent is retried for every call. Timeouts are not retried: the server is
slow, not gone.
"""

from __future__ import annotations

import httpx

from bitserve_client.errors import ApiError

RETRY_STATUSES = frozenset({429, 503})
# Safe to send again whatever happened to the first try (RFC 9110 9.2.2); predict and job
# creation are marked idempotent where they are sent.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# A 503 that says the request was refused before any work (too_many_uploads: before the
# body was read): safe to retry for every call, an upload included.
REFUSED_UNDONE = frozenset({"shutting_down", "too_many_uploads"})
# The connection failed before the request could be sent: safe to retry for every call.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
# The connection broke with no answer (reset, closed): the server may have acted on it.
NO_ANSWER = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
# First pause after a lost connection, doubled per retry (capped by max_retry_wait).
RECONNECT_BACKOFF_S = 0.25


class RetryPolicy:
    """How many times, and how long to wait before each retry."""

    def __init__(self, max_retries: int, max_wait: float) -> None:
        self.max_retries, self.max_wait = max_retries, max_wait

    def after_lost_connection(
        self, exc: httpx.TransportError, *, idempotent: bool, attempt: int
    ) -> float | None:
        """Seconds to wait before sending again, or None to raise `exc`."""
        lost = isinstance(exc, NOT_SENT) or (idempotent and isinstance(exc, NO_ANSWER))
        if not lost or attempt >= self.max_retries:
            return None
        return min(RECONNECT_BACKOFF_S * 2**attempt, self.max_wait)

    def after_error(
        self, status: int, error: ApiError, *, idempotent: bool, attempt: int
    ) -> float | None:
        """Seconds to wait before sending again, or None to raise `error`."""
        retryable = status == 429 or (
            status in RETRY_STATUSES and (idempotent or error.code in REFUSED_UNDONE)
        )
        if not retryable or attempt >= self.max_retries:
            return None
        wait = error.retry_after if error.retry_after is not None else 0.5 * 2**attempt
        return min(wait, self.max_wait)
