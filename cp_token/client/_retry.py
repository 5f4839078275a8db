"""Retries the stamina way: named transient errors only, capped exponential backoff with
full jitter (the one :class:`~cp_token.backoff.Backoff`), ``Retry-After`` honoured, and a
total deadline that no wait may overrun.

Waits go through an injected sleep (the clock's), so tests with a fake clock are instant.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from cp_token.backoff import Backoff, parse_retry_after
from cp_token.clock import Clock

from ._errors import TokenUnavailable

__all__ = ["RetryPolicy", "parse_retry_after", "retry_async", "retry_sync"]

T = TypeVar("T")


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
        ``retry_after``."""
        return Backoff(base=self.initial, cap=self.cap).delay(failures, rand, retry_after)


def _next_wait(
    exc: TokenUnavailable,
    failures: int,
    started: float,
    policy: RetryPolicy,
    clock: Clock,
    rand: Callable[[], float],
) -> float:
    """The wait before the next attempt, or raise when it would overrun the deadline."""
    wait = policy.backoff(failures, rand, exc.retry_after)
    elapsed = clock.monotonic() - started
    if elapsed + wait > policy.deadline:
        raise TokenUnavailable(
            f"gave up after {failures} attempt(s) in {elapsed:.1f}s: {exc}",
            exc.url,
            retry_after=exc.retry_after,
        ) from exc
    return wait


def retry_sync(
    attempt: Callable[[], T],
    *,
    policy: RetryPolicy,
    clock: Clock,
    sleep: Callable[[float], None],
    rand: Callable[[], float],
) -> T:
    """Call ``attempt`` until it returns, retrying :class:`TokenUnavailable` only."""
    started = clock.monotonic()
    failures = 0
    while True:
        try:
            return attempt()
        except TokenUnavailable as exc:
            failures += 1
            sleep(_next_wait(exc, failures, started, policy, clock, rand))


async def retry_async(
    attempt: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    clock: Clock,
    rand: Callable[[], float],
) -> T:
    """Await ``attempt`` until it returns, retrying :class:`TokenUnavailable` only."""
    started = clock.monotonic()
    failures = 0
    while True:
        try:
            return await attempt()
        except TokenUnavailable as exc:
            failures += 1
            await clock.sleep(_next_wait(exc, failures, started, policy, clock, rand))
