"""Caches bounded in entries AND in bytes, on the injected clock.

cachetools counts an entry's size with ``getsizeof`` and keeps the total under ``maxsize``.
Here ``maxsize`` is a byte budget and every entry counts at least ``max_bytes / max_entries``,
so one limit gives both: never more than ``max_entries`` entries, never more than about
``max_bytes`` of estimated payload, whatever mix of small and large entries arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

from cachetools import TLRUCache, TTLCache

__all__ = ["STR_OVERHEAD", "bounded_tlru", "bounded_ttl", "text_bytes"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

STR_OVERHEAD = 56  # what CPython spends on a small str object besides its characters


def text_bytes(*parts: str | None) -> int:
    """An estimate of the memory the strings take (characters plus object overhead)."""
    return sum(STR_OVERHEAD + len(p) for p in parts if p is not None)


def _sizer(max_entries: int, max_bytes: int, estimate: Callable[[V], int]) -> Callable[[V], float]:
    if max_entries < 1 or max_bytes < 1:
        raise ValueError("a bounded cache needs max_entries >= 1 and max_bytes >= 1")
    floor = max_bytes / max_entries

    def getsizeof(value: V) -> float:
        return max(floor, float(estimate(value)))

    return getsizeof


def bounded_ttl(
    *,
    max_entries: int,
    max_bytes: int,
    ttl: float,
    timer: Callable[[], float],
    estimate: Callable[[V], int],
) -> TTLCache[K, V]:
    """A TTLCache holding at most ``max_entries`` entries and ``max_bytes`` estimated bytes."""
    return TTLCache(
        maxsize=max_bytes,
        ttl=ttl,
        timer=timer,
        getsizeof=_sizer(max_entries, max_bytes, estimate),
    )


def bounded_tlru(
    *,
    max_entries: int,
    max_bytes: int,
    ttu: Callable[[K, V, float], float],
    timer: Callable[[], float],
    estimate: Callable[[V], int],
) -> TLRUCache[K, V]:
    """A TLRUCache (per-entry expiry) bounded like :func:`bounded_ttl`."""
    return TLRUCache(
        maxsize=max_bytes,
        ttu=ttu,
        timer=timer,
        getsizeof=_sizer(max_entries, max_bytes, estimate),
    )
