"""Caches bounded in entries AND in bytes, on the injected clock.

Every entry counts an estimated size, at least ``max_bytes / max_entries``, against a byte
budget of ``max_bytes``; so one limit gives both: never more than ``max_entries`` entries,
never more than about ``max_bytes`` of estimated payload, whatever mix of small and large
entries arrives.

:class:`BoundedCache` keeps each entry until its own expiry (given when it is stored) and
evicts the least recently used one when the budget is full; expired entries are dropped
first. A hit is one dictionary lookup, one clock reading and an LRU move: the review cache
is read on every request.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["STR_OVERHEAD", "BoundedCache", "bounded_tlru", "bounded_ttl", "text_bytes"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

STR_OVERHEAD = 56  # what CPython spends on a small str object besides its characters
# The expiry heap is rebuilt from the live entries when stale items outnumber them this much.
HEAP_SLACK = 2


def text_bytes(*parts: str | None) -> int:
    """An estimate of the memory the strings take (characters plus object overhead)."""
    total = 0
    for part in parts:
        if part is not None:
            total += STR_OVERHEAD + len(part)
    return total


class BoundedCache(Generic[K, V]):
    """At most ``max_entries`` entries and ``max_bytes`` estimated bytes; each entry lives
    until ``expires(key, value, now)`` (clock time, exclusive), least recently used first out.
    """

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        expires: Callable[[K, V, float], float],
        timer: Callable[[], float],
        estimate: Callable[[V], int],
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("a bounded cache needs max_entries >= 1 and max_bytes >= 1")
        self.maxsize = max_bytes
        self.currsize = 0.0
        self._floor = max_bytes / max_entries
        self._expires = expires
        self._timer = timer
        self._estimate = estimate
        # key -> (value, expiry, size, sequence number); least recently used first
        self._data: OrderedDict[K, tuple[V, float, float, int]] = OrderedDict()
        self._heap: list[tuple[float, int, K]] = []  # (expiry, sequence, key); some stale
        self._seq = itertools.count()

    def __len__(self) -> int:
        """Entries held (expired ones not dropped yet included)."""
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def values(self) -> list[V]:
        """The values held, least recently used first."""
        return [entry[0] for entry in self._data.values()]

    def get(self, key: K, default: V | None = None) -> V | None:
        """The live value of ``key`` (now the most recently used), else ``default``."""
        entry = self._data.get(key)
        if entry is None:
            return default
        if not self._timer() < entry[1]:
            self._drop(key)
            return default
        self._data.move_to_end(key)
        return entry[0]

    def __setitem__(self, key: K, value: V) -> None:
        """Store ``value`` (an entry already expired is not stored)."""
        now = self._timer()
        expiry = self._expires(key, value, now)
        size = max(self._floor, float(self._estimate(value)))
        if size > self.maxsize:
            raise ValueError("value too large")
        if key in self._data:
            self._drop(key)
        if not now < expiry:
            return
        self._drop_expired(now)
        while self._data and self.currsize + size > self.maxsize:
            self._drop(next(iter(self._data)))
        seq = next(self._seq)
        self._data[key] = (value, expiry, size, seq)
        self.currsize += size
        heapq.heappush(self._heap, (expiry, seq, key))
        if len(self._heap) > HEAP_SLACK * len(self._data) + 64:
            self._heap = [(e[1], e[3], k) for k, e in self._data.items()]
            heapq.heapify(self._heap)

    def discard(self, key: K) -> None:
        """Forget ``key`` (nothing happens when it is not held)."""
        if key in self._data:
            self._drop(key)

    def _drop(self, key: K) -> None:
        entry = self._data.pop(key)
        self.currsize -= entry[2]

    def _drop_expired(self, now: float) -> None:
        heap, data = self._heap, self._data
        while heap and not now < heap[0][0]:
            _, seq, key = heapq.heappop(heap)
            entry = data.get(key)
            if entry is not None and entry[3] == seq:
                self._drop(key)


def bounded_ttl(
    *,
    max_entries: int,
    max_bytes: int,
    ttl: float,
    timer: Callable[[], float],
    estimate: Callable[[V], int],
) -> BoundedCache[K, V]:
    """A cache whose entries live ``ttl`` from when they are stored."""
    return BoundedCache(
        max_entries=max_entries,
        max_bytes=max_bytes,
        expires=lambda _key, _value, now: now + ttl,
        timer=timer,
        estimate=estimate,
    )


def bounded_tlru(
    *,
    max_entries: int,
    max_bytes: int,
    ttu: Callable[[K, V, float], float],
    timer: Callable[[], float],
    estimate: Callable[[V], int],
) -> BoundedCache[K, V]:
    """A cache whose entries live until ``ttu(key, value, now)`` (per-entry expiry)."""
    return BoundedCache(
        max_entries=max_entries, max_bytes=max_bytes, expires=ttu, timer=timer, estimate=estimate
    )
