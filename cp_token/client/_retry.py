"""Retries the stamina way: named transient errors only, capped exponential backoff with
full jitter, ``Retry-After`` honoured, and a total deadline that no wait may overrun.

Waits go through an injected sleep (the clock's), so tests with a fake clock are instant.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

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

    def backoff(self, failures: int, rand: Callable[[], float]) -> float:
        """The wait after the ``failures``-th consecutive failure (1-based)."""
        ceiling = min(self.cap, self.initial * 2.0 ** max(0, failures - 1))
        return rand() * ceiling


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date.

    ``now`` is wall-clock time (for the HTTP-date form). Unparseable values are ignored
    (None), and a date in the past means 0.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive parse means "-0000"
        return None
    seconds = when.timestamp() - now
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _next_wait(
    exc: TokenUnavailable,
    failures: int,
    started: float,
    policy: RetryPolicy,
    clock: Clock,
    rand: Callable[[], float],
) -> float:
    """The wait before the next attempt, or raise when it would overrun the deadline."""
    wait = policy.backoff(failures, rand)
    if exc.retry_after is not None:
        wait = max(wait, exc.retry_after)
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
