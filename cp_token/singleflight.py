"""Concurrent callers asking for the same key share one in-flight call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Singleflight"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Singleflight(Generic[K, V]):
    """One call per key at a time; everyone asking meanwhile awaits the same result.

    The call runs as its own task, so a caller that goes away (a client disconnect
    cancelling its request) does not cancel the work the others are waiting for.
    """

    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Task[V]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    async def do(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        """The result of ``call()``, shared with every concurrent caller of the same key."""
        task = self._inflight.get(key)
        if task is None:

            async def run() -> V:
                return await call()

            task = asyncio.create_task(run())
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        return await asyncio.shield(task)

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: waiters may all have gone away
