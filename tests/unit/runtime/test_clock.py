"""Injected time: the fake clock, RFC 3339 stamps, and a nap that news cuts short."""

from __future__ import annotations

import asyncio
import math

from cp_token.runtime.clock import (
    MAX_SECONDS,
    FakeClock,
    SystemClock,
    parse_rfc3339,
    rfc3339,
    sleep_or_wake,
)


def test_rfc3339() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(1775345580.9) == "2026-04-04T23:33:00Z"  # rounded down, never later
    assert rfc3339(1775345580.25, millis=True) == "2026-04-04T23:33:00.250Z"


def test_parse_rfc3339() -> None:
    assert parse_rfc3339("2026-04-04T23:33:00Z") == 1775345580.0
    assert parse_rfc3339(rfc3339(1775345580.9)) == 1775345580.0
    assert parse_rfc3339("2026-04-04t23:33:00.25z") == 1775345580.25
    assert parse_rfc3339("2026-04-04T23:33:00.123456789+01:00") == 1775345580.123456 - 3600
    for bad in ("2026-04-04T23:33:00", "20260404T233300Z", "2026-02-30T00:00:00Z", "", "x"):
        assert parse_rfc3339(bad) is None, bad
    assert parse_rfc3339(1775345580) is None and parse_rfc3339(None) is None
    assert parse_rfc3339("2026-04-04T23:33:00Z" + " " * 100) is None


def test_rfc3339_stays_within_four_digit_years() -> None:
    last = "9999-12-31T23:59:59Z"
    assert rfc3339(1e20) == last
    assert rfc3339(math.inf) == last and rfc3339(math.nan) == last
    assert rfc3339(-5) == "1970-01-01T00:00:00Z"
    assert rfc3339(1_800_000_000 + MAX_SECONDS) < last


async def test_the_fake_clock_moves_only_when_told_or_slept() -> None:
    clock = FakeClock(start=100.0)
    mono = clock.monotonic()
    assert clock.time() == 100.0
    clock.advance(2.5)
    assert (clock.time(), clock.monotonic()) == (102.5, mono + 2.5)
    await clock.sleep(10)
    assert clock.time() == 112.5
    await clock.sleep(-3)  # a negative nap is no nap
    assert clock.time() == 112.5


async def test_a_nap_ends_on_its_clock() -> None:
    clock = FakeClock()
    wake = asyncio.Event()
    start = clock.monotonic()
    await sleep_or_wake(clock, 30, wake)
    assert clock.monotonic() - start == 30


async def test_news_cuts_a_nap_short() -> None:
    clock = SystemClock()  # a real nap of an hour would fail the test's timeout
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_soon(wake.set)
    await asyncio.wait_for(sleep_or_wake(clock, 3600, wake), timeout=5)
    assert wake.is_set()


async def test_a_nap_without_a_limit_waits_for_news() -> None:
    wake = asyncio.Event()
    task = asyncio.ensure_future(sleep_or_wake(FakeClock(), None, wake))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done()
    wake.set()
    await asyncio.wait_for(task, timeout=5)
