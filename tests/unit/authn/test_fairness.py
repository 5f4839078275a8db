"""Fair review slots: a global cap and a smaller one per caller key, taken by a deadline."""

from __future__ import annotations

import asyncio

from cp_token.authn.fairness import FairSlots
from cp_token.errors import Unavailable


async def test_fair_slots_cap_each_caller() -> None:
    slots = FairSlots(total=8, per_caller=2)
    entered = asyncio.Event()
    release = asyncio.Event()
    holding = 0

    async def hold(keys: list[str], deadline: float) -> str:
        nonlocal holding
        try:
            async with slots.hold(keys, deadline):
                holding += 1
                entered.set()
                await release.wait()
                return "ok"
        except Unavailable as exc:
            return exc.reason

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 0.2
    noisy = [asyncio.create_task(hold(["peer:a"], deadline)) for _ in range(6)]
    await asyncio.sleep(0.05)
    assert slots.held_by("peer:a") == 2
    quiet = [asyncio.create_task(hold([f"peer:{i}"], deadline)) for i in range(5)]
    await asyncio.sleep(0.3)  # past the deadline: the noisy extras gave up
    release.set()
    noisy_results = await asyncio.gather(*noisy)
    assert sorted(noisy_results) == ["caller_saturated"] * 4 + ["ok"] * 2
    assert await asyncio.gather(*quiet) == ["ok"] * 5
    assert len(slots) == 0  # every caller forgotten once idle
