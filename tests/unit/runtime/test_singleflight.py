"""Singleflight: one call per key; a cancelled caller does not cancel the others' call."""

from __future__ import annotations

import asyncio

import pytest

from cp_token.runtime.singleflight import Singleflight


async def test_one_call_shared_and_leader_cancel_is_harmless() -> None:
    sf: Singleflight[str, int] = Singleflight()
    calls = 0
    gate = asyncio.Event()

    async def work() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return 42

    leader = asyncio.create_task(sf.do("k", work))
    followers = [asyncio.create_task(sf.do("k", work)) for _ in range(5)]
    await asyncio.sleep(0)
    leader.cancel()
    gate.set()
    assert await asyncio.gather(*followers) == [42] * 5
    assert calls == 1 and len(sf) == 0
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_errors_reach_every_caller_and_are_not_cached() -> None:
    sf: Singleflight[str, int] = Singleflight()
    attempts = 0

    async def boom() -> int:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0)
        raise ValueError("x")

    results = await asyncio.gather(*(sf.do("k", boom) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results) and attempts == 1
    with pytest.raises(ValueError):
        await sf.do("k", boom)
    assert attempts == 2
