"""A fake clock whose ``sleep`` ends only when the test moves time past it.

:class:`cp_token.runtime.clock.FakeClock` advances itself on ``sleep``, so a background loop
on it runs ahead of the test; on :class:`SteppedClock` the test owns time: background loops
and requests then share one timeline that moves only by ``advance``.
"""

from __future__ import annotations

import asyncio

from cp_token.runtime.clock import FakeClock

__all__ = ["SteppedClock"]


class SteppedClock(FakeClock):
    """``sleep(s)`` returns once ``advance`` has moved the monotonic clock ``s`` further."""

    def __init__(self) -> None:
        super().__init__()
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    @property
    def sleepers(self) -> int:
        """How many ``sleep`` calls are waiting: a test advances time once a background
        loop is asleep, or the loop would go to sleep after the advance and miss it."""
        return len(self._sleepers)

    def advance(self, seconds: float) -> None:
        """Move both clocks forward and wake the sleepers whose time has come."""
        super().advance(seconds)
        now = self.monotonic()
        due = [(t, f) for t, f in self._sleepers if t <= now]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > now]
        for _, fut in due:
            if not fut.done():
                fut.set_result(None)

    async def sleep(self, seconds: float) -> None:
        """Wait until the test has advanced the clock by ``seconds``."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (self.monotonic() + seconds, fut)
        self._sleepers.append(entry)
        try:
            await fut
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)
