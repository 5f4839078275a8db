"""Retries the stamina way: named transient errors only, capped exponential backoff with
full jitter (the one :class:`~cp_token.runtime.backoff.Backoff`), ``Retry-After`` honoured as a
minimum with jitter on top, and a total deadline that no wait may overrun.

Waits go through an injected sleep (the clock's), so tests with a fake clock are instant.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from cp_token.runtime.backoff import Backoff, parse_retry_after
from cp_token.runtime.clock import Clock

from ._errors import TokenUnavailable

__all__ = ["Retrier", "RetryPolicy", "jitter_retry_after", "parse_retry_after"]

T = TypeVar("T")


def jitter_retry_after(retry_after: float, spread: float, rand: Callable[[], float]) -> float:
    """A server's ``Retry-After`` as a minimum with jitter on top: a uniform draw in
    ``[retry_after, retry_after + min(retry_after, spread)]``, so the many callers one server
    told "come back in N s" do not all come back in the same second (SPEC "Riding out
    faults"). ``spread`` is the retry loop's own cap (its backoff's)."""
    return retry_after + rand() * min(retry_after, spread)


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying: ``deadline`` seconds in total, backoff from ``initial`` to
    ``cap`` seconds with full jitter (a uniform wait in ``[0, min(cap, initial * 2**n)]``)."""

    deadline: float = 30.0
    initial: float = 0.5
    cap: float = 5.0

    def backoff(
        self, failures: int, rand: Callable[[], float], retry_after: float | None = None
    ) -> float:
        """The wait after the ``failures``-th consecutive failure (1-based), at least
        ``retry_after``, with jitter on top of it (:func:`jitter_retry_after`)."""
        if retry_after is not None:
            retry_after = jitter_retry_after(retry_after, self.cap, rand)
        return Backoff(base=self.initial, cap=self.cap).delay(failures, rand, retry_after)


class _Tries:
    """One call's attempts so far: how long to wait after a failure, within the deadline."""

    def __init__(self, policy: RetryPolicy, clock: Clock, rand: Callable[[], float]) -> None:
        self._policy, self._clock, self._rand = policy, clock, rand
        self._started = clock.monotonic()
        self._failures = 0

    def wait_after(self, exc: TokenUnavailable) -> float:
        """The wait before the next attempt; raises when it would overrun the deadline."""
        self._failures += 1
        wait = self._policy.backoff(self._failures, self._rand, exc.retry_after)
        elapsed = self._clock.monotonic() - self._started
        if elapsed + wait > self._policy.deadline:
            raise TokenUnavailable(
                f"gave up after {self._failures} attempt(s) in {elapsed:.1f}s: {exc}",
                exc.url,
                retry_after=exc.retry_after,
            ) from exc
        return wait


@dataclass(frozen=True)
class Retrier:
    """A :class:`RetryPolicy` on a clock: calls an attempt until it returns, retrying
    :class:`TokenUnavailable` only (anything else, e.g. a refusal, is raised at once)."""

    policy: RetryPolicy
    clock: Clock
    rand: Callable[[], float]

    def call(self, attempt: Callable[[], T], sleep: Callable[[float], None]) -> T:
        """Blocking: waits with ``sleep`` (the clock's own in tests)."""
        tries = _Tries(self.policy, self.clock, self.rand)
        while True:
            try:
                return attempt()
            except TokenUnavailable as exc:
                sleep(tries.wait_after(exc))

    async def acall(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Async: waits on the clock."""
        tries = _Tries(self.policy, self.clock, self.rand)
        while True:
            try:
                return await attempt()
            except TokenUnavailable as exc:
                await self.clock.sleep(tries.wait_after(exc))
