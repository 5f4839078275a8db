"""Per-identity token buckets on the injected monotonic clock."""

from __future__ import annotations

from cachetools import TTLCache

from cp_token.clock import Clock
from cp_token.errors import RateLimited
from cp_token.identity import token_hash

__all__ = ["RateLimiter"]


class RateLimiter:
    """``rate`` tokens per second, up to ``burst``, per key (the caller's username)."""

    def __init__(self, rate: float, burst: int, clock: Clock, maxsize: int = 100_000) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        # An idle bucket refills completely after burst/rate seconds, then can be forgotten.
        # Buckets are keyed by a fixed-size hash of the key, so the entry bound is a byte bound.
        idle = burst / rate + 1.0
        self._buckets: TTLCache[str, tuple[float, float]] = TTLCache(
            maxsize=maxsize, ttl=idle, timer=clock.monotonic
        )

    def check(self, key: str) -> None:
        """Take one token for ``key`` or raise RateLimited with the wait in Retry-After."""
        now = self._clock.monotonic()
        key = token_hash(key)
        tokens, last = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            raise RateLimited(
                "too many token requests for this identity", retry_after=(1.0 - tokens) / self._rate
            )
        self._buckets[key] = (tokens - 1.0, now)
