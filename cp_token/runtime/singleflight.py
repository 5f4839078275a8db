"""Concurrent callers asking for the same thing share one in-flight call.

The one helper for "join the call in progress, or start one": :class:`Singleflight` per key
(reviews, object reads), :class:`SharedCall` for a single thing (the ``oidc`` minter's
upstream token, the client's token, the sidecar's fetch).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["SharedCall", "Singleflight"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


async def _run(call: Callable[[], Awaitable[V]]) -> V:
    return await call()


class Singleflight(Generic[K, V]):
    """One call per key at a time; everyone asking meanwhile awaits the same result.

    The call runs as its own task, so a caller that goes away (a client disconnect
    cancelling its request) does not cancel the work the others are waiting for. A call is
    shared only on the event loop that started it (a sync wrapper may run several loops).
    """

    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Task[V]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    def running(self, key: K) -> bool:
        """Whether a call for ``key`` is in flight."""
        task = self._inflight.get(key)
        return task is not None and not task.done()

    async def do(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        """The result of ``call()``, shared with every concurrent caller of the same key."""
        loop = asyncio.get_running_loop()
        task = self._inflight.get(key)
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(_run(call))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return await asyncio.shield(task)

    def cancel(self) -> None:
        """Cancel every call in flight (at shutdown)."""
        for task in list(self._inflight.values()):
            task.cancel()

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: waiters may all have gone away


class SharedCall(Generic[V]):
    """:class:`Singleflight` without a key: at most one call in flight, shared by all."""

    def __init__(self) -> None:
        self._flight: Singleflight[None, V] = Singleflight()

    @property
    def running(self) -> bool:
        """Whether a call is in flight."""
        return self._flight.running(None)

    async def do(self, call: Callable[[], Awaitable[V]]) -> V:
        """The result of ``call()``, or of the call already in flight."""
        return await self._flight.do(None, call)

    def cancel(self) -> None:
        """Cancel the call in flight, if any."""
        self._flight.cancel()
