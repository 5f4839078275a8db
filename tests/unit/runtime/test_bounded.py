"""The bounded cache: each entry lives until its own expiry, the least recently used goes first,
and both bounds (entries and bytes) hold."""

from __future__ import annotations

from typing import Any

import pytest

from cp_token.runtime.bounded import BoundedCache, bounded_ttl
from cp_token.runtime.clock import FakeClock


def cache(clock: FakeClock, entries: int = 100, size: int = 10_000) -> BoundedCache[str, Any]:
    return BoundedCache(
        max_entries=entries,
        max_bytes=size,
        expires=lambda _k, value, now: now + value[1],
        timer=clock.monotonic,
        estimate=lambda value: value[0],
    )


def test_each_entry_lives_until_its_own_expiry() -> None:
    clock = FakeClock()
    c = cache(clock)
    c["short"], c["long"] = (1, 5.0), (1, 50.0)
    clock.advance(4.9)
    assert c.get("short") == (1, 5.0)
    clock.advance(0.1)  # expiry is exclusive
    assert c.get("short") is None and c.get("long") == (1, 50.0)
    c["gone"] = (1, 0.0)  # already expired: not stored
    assert c.get("gone") is None and len(c) == 1


def test_the_least_recently_used_goes_first_when_full() -> None:
    clock = FakeClock()
    c = cache(clock, entries=3, size=3_000)
    c["a"], c["b"], c["c"] = (10, 60.0), (10, 60.0), (10, 60.0)
    assert c.get("a") is not None  # a is now the most recently used
    c["d"] = (10, 60.0)
    assert set(c) == {"a", "c", "d"}
    c["big"] = (2_000, 60.0)  # the byte bound: room is made from the least recently used
    assert set(c) == {"d", "big"} and c.currsize <= c.maxsize


def test_expired_entries_are_dropped_before_live_ones() -> None:
    clock = FakeClock()
    c = cache(clock, entries=2, size=2_000)
    c["old"], c["live"] = (10, 1.0), (10, 60.0)
    assert c.get("live") is not None
    clock.advance(2)
    c["new"] = (10, 60.0)
    assert set(c) == {"live", "new"}


def test_replacing_keeps_the_bounds_and_the_expiry_heap_stays_small() -> None:
    clock = FakeClock()
    c = cache(clock, entries=10, size=10_000)
    for i in range(10_000):
        c[f"k{i % 20}"] = (100, 3600.0)
    assert len(c) == 10 and c.currsize == 10 * 1000  # each counts at least max_bytes / 10
    # cachetools' expiry heap (private): compacted once stale items outnumber live ones
    assert len(c._TLRUCache__order) <= 2 * len(c) + 64  # type: ignore[attr-defined]


def test_a_value_over_the_whole_budget_is_refused() -> None:
    c = cache(FakeClock(), entries=10, size=100)
    with pytest.raises(ValueError, match="too large"):
        c["x"] = (101, 60.0)


def test_bounded_ttl_counts_entries_and_bytes() -> None:
    clock = FakeClock()
    c: Any = bounded_ttl(max_entries=5, max_bytes=500, ttl=10, timer=clock.monotonic, estimate=len)
    for i in range(50):
        c[i] = "x"
    assert len(c) == 5
    clock.advance(10)
    assert c.get(49) is None


def test_bounded_cache_counts_entries_and_bytes() -> None:
    clock = FakeClock()
    cache: Any = bounded_ttl(
        max_entries=100, max_bytes=10_000, ttl=60, timer=clock.monotonic, estimate=len
    )
    for i in range(1000):
        cache[i] = "x"  # small: the entry bound holds
    assert len(cache) == 100
    for i in range(1000):
        cache[i] = "x" * 1000  # large: the byte bound holds
    assert len(cache) <= 10 and cache.currsize <= 10_000
