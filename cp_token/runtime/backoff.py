"""The one backoff policy of the code base: capped exponential, full jitter, ``Retry-After``.

Every retry loop uses it: the client's retries (:class:`cp_token.client._retry.RetryPolicy`), the
sidecar's holder and the ``oidc`` minter (its request path and its background refresher
share one :class:`Pacer`). Time and randomness are injected, so tests are exact.

The rule (AWS's "full jitter", stamina's): after the ``n``-th consecutive failure wait a
uniform draw in ``[0, min(cap, base * 2**(n-1))]``, never less than ``floor`` (so a draw
near 0 cannot turn retries into a hot loop) and never less than a ``Retry-After`` the
server sent.

Standard library only: the client library imports this module without the server's
dependencies.
"""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["MAX_RETRY_AFTER_DIGITS", "Backoff", "MonotonicClock", "Pacer", "parse_retry_after"]

_MAX_EXPONENT = 62  # 2.0**62 is finite; the cap applies long before
MAX_RETRY_AFTER_DIGITS = 9  # over 30 years: no server means it; ignored, not an overflow


class MonotonicClock(Protocol):
    """The part of :class:`cp_token.runtime.clock.Clock` a backoff needs."""

    def monotonic(self) -> float:
        """Monotonic seconds."""
        ...


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with full jitter, a floor, and ``Retry-After`` respected."""

    base: float = 1.0
    cap: float = 60.0
    floor: float = 0.0

    def ceiling(self, failures: int) -> float:
        """The top of the jitter window after ``failures`` consecutive failures (1-based)."""
        if failures <= 0:
            return 0.0
        return min(self.cap, self.base * 2.0 ** min(failures - 1, _MAX_EXPONENT))

    def delay(
        self, failures: int, rand: Callable[[], float], retry_after: float | None = None
    ) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure (1-based).

        ``rand`` draws in ``[0, 1)``; ``retry_after`` (the server's ``Retry-After``, in
        seconds) is a minimum: the wait is never shorter than it.
        """
        wait = max(self.floor, rand() * self.ceiling(failures))
        if retry_after is not None and math.isfinite(retry_after):
            wait = max(wait, retry_after)
        return wait


class Pacer:
    """Paces calls to one failing dependency, whoever makes them.

    Every failure (:meth:`failed`) pushes the earliest time of the next call out by one
    backoff draw; a success (:meth:`succeeded`) or :meth:`reset` allows a call at once.
    Callers ask :meth:`wait` before calling: while it is positive, answer from the state
    (e.g. 503 with ``Retry-After: wait``) instead of calling.
    """

    def __init__(
        self,
        policy: Backoff,
        clock: MonotonicClock,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._rand = rand
        self._failures = 0
        self._next_at = -math.inf

    @property
    def failures(self) -> int:
        """Consecutive failures since the last success or reset."""
        return self._failures

    def failed(self, retry_after: float | None = None) -> float:
        """Record a failure; returns the seconds until the next call may start."""
        self._failures += 1
        delay = self.policy.delay(self._failures, self._rand, retry_after)
        self._next_at = self._clock.monotonic() + delay
        return delay

    def succeeded(self) -> None:
        """Record a success: the next call may start at once."""
        self.reset()

    def reset(self) -> None:
        """Forget the failures (e.g. new credentials): the next call may start at once."""
        self._failures = 0
        self._next_at = -math.inf

    def wait(self) -> float:
        """Seconds until the next call may start (0: now)."""
        return max(0.0, self._next_at - self._clock.monotonic())


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date.

    ``now`` is wall-clock time (for the HTTP-date form). A value that is neither (words,
    superscript digits, a negative number), a number of more than
    :data:`MAX_RETRY_AFTER_DIGITS` digits, or a date that does not exist or overflows is
    ignored (None): it is an upstream's answer, untrusted input, and never raises. A date
    in the past means 0.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() alone accepts "¹"
        if len(value) > MAX_RETRY_AFTER_DIGITS:
            return None
        return float(int(value))
    if len(value) > 64:  # an IMF-fixdate is 29 characters
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive parse means "-0000"
            return None
        seconds = when.timestamp() - now
    except (TypeError, ValueError, IndexError, OverflowError):  # year 99999, 10**30 ...
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None
