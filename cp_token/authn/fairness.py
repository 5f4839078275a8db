"""Review slots shared fairly: a global cap, and a smaller cap per caller.

A caller is named by one or more keys (its source address, the unverified ``sub`` of its
token); a request holds one slot of every key it names plus one global slot. No key can hold
more than ``per_caller`` slots, so one noisy pod (or one forged identity) can take only a
small share of the API server's review capacity while everyone else keeps theirs. Keys are
forgotten as soon as nobody holds or waits for them, so the table is bounded by the requests
in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from cp_token.errors import Unavailable

__all__ = ["FairSlots"]


@dataclass
class _Share:
    slots: asyncio.Semaphore
    users: int = 0  # holding or waiting
    holding: int = 0


async def _acquire(slots: asyncio.Semaphore, deadline: float) -> bool:
    """Take a slot, waiting until ``deadline`` (event-loop time) at the latest."""
    if not slots.locked():
        await slots.acquire()  # free now: never refused because the budget ran out
        return True
    timeout = deadline - asyncio.get_running_loop().time()
    if timeout <= 0:
        return False
    try:
        await asyncio.wait_for(slots.acquire(), timeout=timeout)
    except TimeoutError:
        return False
    return True


class FairSlots:
    """At most ``total`` holders at once, and at most ``per_caller`` per caller key."""

    def __init__(self, total: int, per_caller: int) -> None:
        self.total = total
        self.per_caller = max(1, min(per_caller, total))
        self._global = asyncio.Semaphore(total)
        self._shares: dict[str, _Share] = {}

    def __len__(self) -> int:
        """Caller keys currently tracked (holding or waiting)."""
        return len(self._shares)

    def held_by(self, key: str) -> int:
        """Slots the caller ``key`` holds now."""
        share = self._shares.get(key)
        return 0 if share is None else share.holding

    def hold(self, callers: Sequence[str], deadline: float) -> _Hold:
        """``async with``: hold one slot per caller key and one global slot; 503 if not free
        by ``deadline``.

        Keys are taken in sorted order, so two requests naming the same keys never wait for
        each other in a cycle.
        """
        return _Hold(self, sorted(set(callers)), deadline)

    def _share(self, key: str) -> _Share:
        share = self._shares.get(key)
        if share is None:
            share = self._shares[key] = _Share(asyncio.Semaphore(self.per_caller))
        share.users += 1
        return share

    def _leave(self, key: str, share: _Share) -> None:
        share.users -= 1
        if share.users == 0 and self._shares.get(key) is share:
            del self._shares[key]


class _Hold:
    """The slots of one review (a class, not a generator: entered once per cold request)."""

    __slots__ = ("_acquired", "_deadline", "_entered", "_global_held", "_keys", "_slots")

    def __init__(self, slots: FairSlots, keys: list[str], deadline: float) -> None:
        self._slots = slots
        self._keys = keys
        self._deadline = deadline
        self._entered: list[tuple[str, _Share]] = []
        self._acquired: list[_Share] = []
        self._global_held = False

    async def __aenter__(self) -> None:
        slots, deadline = self._slots, self._deadline
        try:
            for key in self._keys:
                share = slots._share(key)
                self._entered.append((key, share))
                if not await _acquire(share.slots, deadline):
                    raise Unavailable(
                        "too many token reviews in flight for this caller; retry shortly",
                        reason="caller_saturated",
                        retry_after=1,
                    )
                share.holding += 1
                self._acquired.append(share)
            if not await _acquire(slots._global, deadline):
                raise Unavailable(
                    "too many token reviews in flight; retry shortly",
                    reason="reviews_saturated",
                    retry_after=1,
                )
            self._global_held = True
        except BaseException:
            self._release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        if self._global_held:
            self._global_held = False
            self._slots._global.release()
        for share in reversed(self._acquired):
            share.holding -= 1
            share.slots.release()
        self._acquired.clear()
        for key, share in self._entered:
            self._slots._leave(key, share)
        self._entered.clear()
