"""Per-process admission of the requests that cost the most: uploads and predicts.

Both are refused at once with 503 + Retry-After past their bound, before a byte of the body
is read, so a burst of them cannot pile up memory, temp files or threads (issue 11). The
counts live in one gateway process (its event loop is one thread: a check and its increment
cannot interleave); N replicas admit N times as much.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service.domain_errors import Unavailable

UPLOAD_RETRY_AFTER_S = 5
PREDICT_RETRY_AFTER_S = 1


class UploadSlots:
    """At most `limit` uploads received or unpacked at once; past it Unavailable
    `too_many_uploads`. Each holds a temp file, a thread while it unpacks and decodes, and
    disk: unbounded, a few clients could take them all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @contextmanager
    def take(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise Unavailable(
                "too_many_uploads",
                f"{self.active} uploads are in progress (limit {self.limit}); retry later",
                {"limit": self.limit},
                retry_after=UPLOAD_RETRY_AFTER_S,
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class PredictAdmission:
    """Predict requests admitted at once, by count and by declared body bytes.

    Taken before the body is read (service.routers.models): the serving queue
    (service.serving) counts images only once they are decoded, so without this, eight
    concurrent 63 MB base64 bodies were all read, parsed and decoded together (+0.9 GB). A body
    without a Content-Length counts as the largest allowed. Past either bound: Unavailable
    `overloaded`. One request alone is always admitted (its own byte cap bounds it).
    """

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0

    @contextmanager
    def admit(self, declared_bytes: int) -> Iterator[None]:
        busy = self.requests >= self.max_requests or (
            self.requests > 0 and self.bytes + declared_bytes > self.max_bytes
        )
        if busy:
            raise Unavailable(
                "overloaded",
                f"the server is busy ({self.requests} predict requests, {self.bytes} body "
                "bytes in progress); retry later",
                {"requests": self.requests, "limit": self.max_requests},
                retry_after=PREDICT_RETRY_AFTER_S,
            )
        self.requests += 1
        self.bytes += declared_bytes
        try:
            yield
        finally:
            self.requests -= 1
            self.bytes -= declared_bytes
