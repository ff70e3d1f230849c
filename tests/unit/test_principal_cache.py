"""The gateway's short memory of checked API keys (service.auth.PrincipalCache)."""

from __future__ import annotations

from datetime import timedelta

from service.api_keys import Principal, Scope
from service.auth import PrincipalCache
from service.ids import utcnow


def principal(key_id: str, **extra: object) -> Principal:
    return Principal("acme", frozenset({Scope.PREDICT}), key_id=key_id, **extra)  # type: ignore[arg-type]


def test_a_checked_key_is_trusted_for_the_cache_time_only() -> None:
    now = [100.0]
    cache = PrincipalCache(seconds=5.0, clock=lambda: now[0])
    cache.put("bsk_a", principal("key_a"))
    assert cache.get("bsk_a") == principal("key_a")
    assert cache.get("bsk_b") is None
    now[0] = 104.9
    assert cache.get("bsk_a") is not None
    now[0] = 105.0
    assert cache.get("bsk_a") is None  # checked in the database again


def test_expiry_and_revocation_take_effect_at_once() -> None:
    cache = PrincipalCache(seconds=60.0)
    cache.put("bsk_old", principal("key_old", expires_at=utcnow() - timedelta(seconds=1)))
    assert cache.get("bsk_old") is None
    cache.put("bsk_a", principal("key_a"))
    cache.put("bsk_a2", principal("key_a"))
    cache.put("bsk_b", principal("key_b"))
    cache.forget("key_a")
    assert (cache.get("bsk_a"), cache.get("bsk_a2")) == (None, None)
    assert cache.get("bsk_b") == principal("key_b")


def test_the_cache_is_bounded_and_keeps_no_key() -> None:
    cache = PrincipalCache(entries=2)
    for name in ("a", "b", "c"):
        cache.put(f"bsk_{name}", principal(f"key_{name}"))
    assert cache.get("bsk_a") is None and cache.get("bsk_c") is not None
    assert not any(isinstance(k, str) for k in cache._items)  # digests only
