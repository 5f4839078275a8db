"""Let the event loop run, bounded in rounds, never in wall-clock time.

A unit test that waits for background work (a task started, a loop asleep on the fake clock)
yields with ``asyncio.sleep(0)`` until a condition holds, and fails after a number of rounds
instead of after some seconds: nothing waits for time to pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["run_until", "spin"]


async def run_until(predicate: Callable[[], object], what: str = "", rounds: int = 5000) -> None:
    """Yield to the event loop until ``predicate()`` is true; AssertionError after ``rounds``."""
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not reached in {rounds} rounds of the event loop: {what}")


async def spin(rounds: int = 100) -> None:
    """Yield to the event loop ``rounds`` times: whatever is ready runs (no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)
