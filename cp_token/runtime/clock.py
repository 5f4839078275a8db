"""Injected time: wall clock for expiry stamps, monotonic clock for intervals.

Everything time-based takes a :class:`Clock`, so tests move a :class:`FakeClock` instead of
sleeping.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from datetime import datetime
from typing import Any, Protocol

__all__ = [
    "MAX_SECONDS",
    "Clock",
    "FakeClock",
    "SystemClock",
    "parse_rfc3339",
    "rfc3339",
    "sleep_or_wake",
]


class Clock(Protocol):
    """Source of time for expiry, caching, backoff and rate limiting."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch (for `exp`, `iat`, `expires_at`)."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds (for intervals: caches, refresh deadlines, buckets)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch."""
        return time.time()

    def monotonic(self) -> float:
        """Monotonic seconds."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep on the event loop."""
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that only moves when told to; `sleep` advances it instantly."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._wall = start
        self._mono = 1000.0

    def time(self) -> float:
        """Fake wall-clock seconds."""
        return self._wall

    def monotonic(self) -> float:
        """Fake monotonic seconds."""
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move both clocks forward."""
        self._wall += seconds
        self._mono += seconds

    async def sleep(self, seconds: float) -> None:
        """Advance instead of waiting, then yield to the loop once."""
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)


# The longest duration accepted anywhere (a setting, an upstream token's lifetime): nothing
# the product does lasts longer, and wall-clock sums stay far inside RFC 3339's years.
MAX_SECONDS = 10 * 365 * 86400
_LAST_RFC3339 = 253402300799  # 9999-12-31T23:59:59Z: RFC 3339 has four-digit years


def rfc3339(ts: float, *, millis: bool = False) -> str:
    """Wall-clock seconds as RFC 3339 UTC with a ``Z``: whole seconds, rounded down (the CP's
    ``expires_at``), or with milliseconds (``millis``: log timestamps). Times past the year
    9999 (a static token's ``exp`` may say anything) are written as its last second."""
    ts = min(max(ts, 0.0), _LAST_RFC3339) if math.isfinite(ts) else _LAST_RFC3339
    whole = math.floor(ts)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    if millis:
        text += f".{int((ts - whole) * 1000):03d}"
    return text + "Z"


# RFC 3339 section 5.6 date-time (what Kubernetes writes: metav1.Time, "2026-04-04T23:33:00Z"),
# with a time offset always: a time without one names no instant.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})", re.ASCII
)


def parse_rfc3339(text: object) -> float | None:
    """Wall-clock seconds of an RFC 3339 date-time (``2026-04-04T23:33:00Z``, fractions and
    offsets too); None for anything else (not a string, another format, an impossible date)."""
    if not isinstance(text, str) or len(text) > 40 or not _RFC3339.fullmatch(text):
        return None
    text = text.upper()
    head, dot, tail = text.partition(".")
    if dot:  # datetime keeps microseconds: drop digits beyond six
        digits = len(tail) - len(tail.lstrip("0123456789"))
        text = f"{head}.{tail[: min(digits, 6)]}{tail[digits:]}"
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


async def sleep_or_wake(clock: Clock, seconds: float | None, wake: asyncio.Event) -> None:
    """Wait ``seconds`` on ``clock`` (None: no limit) or until ``wake`` is set, whichever
    comes first: a background loop's nap that news (a fetch done, a file changed) cuts
    short. The caller clears ``wake`` before deciding to sleep."""
    waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(wake.wait())]
    if seconds is not None:
        waits.append(asyncio.ensure_future(clock.sleep(seconds)))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
