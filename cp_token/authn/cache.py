"""The review cache in front of every authenticator.

- Successful reviews are reused for ``ttl`` seconds, never past the token's own ``exp``.
- Failed reviews are remembered for a few seconds, so a replayed bad token costs nothing.
- Concurrent requests with the same token share one review (singleflight).
- At most ``max_in_flight`` reviews run at once; beyond it a request waits briefly, then 503.

Keys are SHA-256 hashes of the token, never the token.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cachetools import TLRUCache, TTLCache

from cp_token.authn import Reviewer
from cp_token.authn.precheck import precheck
from cp_token.clock import Clock
from cp_token.errors import Unauthenticated, Unavailable
from cp_token.identity import Identity, token_hash
from cp_token.singleflight import Singleflight

__all__ = ["CachedAuthenticator"]

NEGATIVE_TTL = 5.0
QUEUE_WAIT = 2.0


class CachedAuthenticator:
    """Precheck, cache, coalesce and cap calls to a :class:`Reviewer`."""

    def __init__(
        self,
        reviewer: Reviewer,
        *,
        clock: Clock,
        audiences: tuple[str, ...],
        ttl: float,
        max_in_flight: int,
        jwt_precheck: bool = True,
        maxsize: int = 100_000,
        queue_wait: float = QUEUE_WAIT,
        metrics: Any = None,
    ) -> None:
        self._reviewer = reviewer
        self._clock = clock
        self._audiences = audiences
        self._ttl = ttl
        self._jwt_precheck = jwt_precheck
        self._queue_wait = queue_wait
        self._metrics = metrics
        # value = (identity, monotonic deadline); the deadline is min(ttl, token exp).
        self._ok: TLRUCache[str, tuple[Identity, float]] = TLRUCache(
            maxsize=maxsize, ttu=lambda _k, v, _now: v[1], timer=clock.monotonic
        )
        self._bad: TTLCache[str, Unauthenticated] = TTLCache(
            maxsize=maxsize, ttl=NEGATIVE_TTL, timer=clock.monotonic
        )
        self._inflight: Singleflight[str, Identity] = Singleflight()
        self._slots = asyncio.Semaphore(max_in_flight)
        self.reviews = 0  # upstream reviews started, for tests and metrics

    async def aclose(self) -> None:
        """Close the reviewer's connections."""
        close = getattr(self._reviewer, "aclose", None)
        if close is not None:
            await close()

    def _hit(self, cache: str, hit: bool) -> None:
        if self._metrics is not None:
            self._metrics.cache(cache, hit)

    async def authenticate(self, token: str) -> Identity:
        """The caller's identity, or raise Unauthenticated / Unavailable."""
        key = token_hash(token)
        cached = self._ok.get(key)
        if cached is not None:
            self._hit("review", True)
            return cached[0]
        bad = self._bad.get(key)
        if bad is not None:
            self._hit("review_negative", True)
            raise bad
        self._hit("review", False)
        if self._jwt_precheck:
            precheck(token, self._audiences, self._clock.time())

        return await self._inflight.do(key, lambda: self._review(key, token))

    async def _review(self, key: str, token: str) -> Identity:
        try:
            identity = await self._review_capped(token)
        except Unauthenticated as exc:
            self._bad[key] = exc
            raise
        self._remember(key, identity)
        return identity

    def _remember(self, key: str, identity: Identity) -> None:
        deadline = self._clock.monotonic() + self._ttl
        if identity.expires_at is not None:
            left = identity.expires_at - self._clock.time()
            deadline = min(deadline, self._clock.monotonic() + left)
        if deadline > self._clock.monotonic():
            self._ok[key] = (identity, deadline)

    async def _review_capped(self, token: str) -> Identity:
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self._queue_wait)
        except TimeoutError:
            raise Unavailable(
                "too many token reviews in flight; retry shortly",
                reason="reviews_saturated",
                retry_after=1,
            ) from None
        try:
            self.reviews += 1
            if self._metrics is not None:
                self._metrics.reviews_in_flight.inc()
            return await self._reviewer.review(token)
        finally:
            if self._metrics is not None:
                self._metrics.reviews_in_flight.dec()
            self._slots.release()
