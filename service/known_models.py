"""Which models a tenant was recently found to own, remembered per gateway process.

A predict request checks that the tenant owns the model before its body is read (404 for an
unknown id or another tenant's model). Reading the row costs a database round trip and a
thread-pool hop per request, which was the largest single item of the gateway's own CPU per
request after the forward pass (benchmarks/RESULTS.md, "Gateway overhead per request"). A
model found in the database is trusted for `seconds` (5, like an API key in service.auth and a
tenant's predict rate in service.quotas):

- A model deleted through this process is forgotten at once (the delete route calls `forget`),
  and a lookup that was already running when it was forgotten is not remembered (`generation`),
  so this process never answers from the cache for a model it deleted.
- A model deleted through another gateway process is answered 404 here within `seconds`;
  until then a loaded copy may still answer, or a model whose files are gone answers 503
  `model_unavailable`.
- Only hits are kept: a model that appears (a job just succeeded) is found at once.

Used on the event loop only (no lock); bounded to `entries`, the least recently checked first
out.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

CACHE_SECONDS = 5.0
CACHE_ENTRIES = 10_000


class KnownModels:
    """(tenant, model id) pairs found in the database in the last `seconds`."""

    def __init__(
        self,
        seconds: float = CACHE_SECONDS,
        entries: int = CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds, self.entries, self.clock = seconds, entries, clock
        self._until: OrderedDict[tuple[str | None, str], float] = OrderedDict()
        # Bumped by every forget(): a lookup started before it may have read a deleted row.
        self.generation = 0

    def known(self, tenant_id: str | None, model_id: str) -> bool:
        key = (tenant_id, model_id)
        until = self._until.get(key)
        if until is None:
            return False
        if self.clock() >= until:
            del self._until[key]
            return False
        self._until.move_to_end(key)
        return True

    def remember(self, tenant_id: str | None, model_id: str, generation: int) -> None:
        """Keep a model found by a lookup that started at `generation` (self.generation then);
        ignored if a model was forgotten since (it may be this one, deleted meanwhile)."""
        if generation != self.generation:
            return
        self._until[(tenant_id, model_id)] = self.clock() + self.seconds
        self._until.move_to_end((tenant_id, model_id))
        while len(self._until) > self.entries:
            self._until.popitem(last=False)

    def forget(self, model_id: str) -> None:
        """Drop a model at once, for every tenant (it was deleted through this process)."""
        self.generation += 1
        for key in [key for key in self._until if key[1] == model_id]:
            del self._until[key]
