"""An event loop on virtual time: the fake clock of the loop's own timers.

The product keeps its deadlines on the event loop's clock (``asyncio.timeout``,
``wait_for``, ``loop.time()``: a review's queue wait and answer bound, the fair slots, the
Kubernetes client's timeout), while expiries and backoffs use the injected clock
(:mod:`cp_token.runtime.clock`). A unit test of such a deadline runs on
:class:`VirtualTimeLoop`: whenever nothing is ready to run and no socket has data, the loop's
clock jumps to its next timer instead of waiting for it, so "the 503 comes within 0.65 s" is
checked exactly and takes no wall-clock time at all.

Sockets still work (a loopback server in the same loop: data written is readable at once);
a worker thread does not mix with it (while one runs, a pending timer would fire early), so
only in-loop code runs on virtual time. Use :func:`run` for the test body, and
:func:`advance` where the test itself lets time pass (it refuses to run on a real loop).
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

__all__ = ["VirtualTimeLoop", "advance", "run"]

T = TypeVar("T")


class _VirtualSelector(selectors.BaseSelector):
    """The real selector, asked without waiting; when nothing is ready, time jumps."""

    def __init__(self, loop_clock: list[float]) -> None:
        self._real = selectors.DefaultSelector()
        self._clock = loop_clock

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        if ready:
            return ready
        if timeout is None:  # no timer at all: wait for real events (a thread, a signal)
            return self._real.select(None)
        if timeout > 0:
            self._clock[0] += timeout  # the next timer is due now
        return []

    def close(self) -> None:
        self._real.close()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.get_key(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._real.get_map()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` moves only to the next due timer."""

    def __init__(self) -> None:
        self._virtual = [0.0]
        super().__init__(_VirtualSelector(self._virtual))

    def time(self) -> float:
        """Virtual seconds since the loop was made."""
        return self._virtual[0]


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh :class:`VirtualTimeLoop`, then close it."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


async def advance(seconds: float) -> None:
    """Let ``seconds`` of loop time pass (at once, on virtual time); refuses a real loop."""
    loop = asyncio.get_running_loop()
    if not isinstance(loop, VirtualTimeLoop):
        raise RuntimeError("advance() moves virtual time: run the test with looptime.run()")
    await asyncio.sleep(seconds)
