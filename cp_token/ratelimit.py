"""Per-identity token buckets on the injected monotonic clock."""

from __future__ import annotations

from collections import OrderedDict

from cp_token.errors import RateLimited
from cp_token.identity import token_hash
from cp_token.runtime.clock import Clock

__all__ = ["MAX_KEY_CHARS", "RateLimiter"]

# Longer keys are replaced by their SHA-256 (64 hex characters), so every key is at most
# this long and the entry bound is a byte bound. A ServiceAccount username is shorter.
MAX_KEY_CHARS = 64
# About 260 bytes each (tracemalloc): 13 MiB when full. A bucket is forgotten once idle long
# enough to be full again (burst / rate seconds), so the bound matters only when more
# identities than this ask within that window; the oldest then starts over, full.
MAX_BUCKETS = 50_000


class RateLimiter:
    """``rate`` tokens per second, up to ``burst``, per key (the caller's username).

    At most ``maxsize`` buckets are kept. Buckets are kept in order of last use: an idle
    bucket has refilled completely after ``burst / rate`` seconds, so it is forgotten then
    (when a new key arrives), and beyond ``maxsize`` the least recently used one goes.
    One check is a dictionary lookup and an in-place update.
    """

    def __init__(self, rate: float, burst: int, clock: Clock, maxsize: int = MAX_BUCKETS) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._maxsize = maxsize
        self._idle = burst / rate + 1.0
        # key -> [tokens, monotonic time of the last check]; oldest use first
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        """Buckets kept now."""
        return len(self._buckets)

    def check(self, key: str) -> None:
        """Take one token for ``key`` or raise RateLimited with the wait in Retry-After."""
        now = self._clock.monotonic()
        if len(key) > MAX_KEY_CHARS:
            key = token_hash(key)
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            self._forget(now)
            bucket = buckets[key] = [self._burst, now]
        else:
            buckets.move_to_end(key)
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            raise RateLimited(
                "too many token requests for this identity", retry_after=(1.0 - tokens) / self._rate
            )
        bucket[0] = tokens - 1.0

    def _forget(self, now: float) -> None:
        """Drop buckets idle long enough to be full again, and the oldest beyond the bound."""
        buckets = self._buckets
        while buckets:
            oldest = next(iter(buckets))
            if len(buckets) < self._maxsize and now - buckets[oldest][1] < self._idle:
                return
            del buckets[oldest]
