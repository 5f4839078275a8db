"""Fair review slots: a global cap and a smaller one per caller key, taken by a deadline."""

from __future__ import annotations

import asyncio

from cp_token.authn.fairness import FairSlots
from cp_token.errors import Unavailable
from tests.fakes import looptime


def test_fair_slots_cap_each_caller() -> None:
    """One caller key holds at most 2 of 8 slots; its extra requests give up at the deadline
    (loop time, virtual) while other callers get theirs; every key is forgotten once idle."""
    slots = FairSlots(total=8, per_caller=2)

    async def main() -> tuple[list[str], list[str]]:
        release = asyncio.Event()

        async def hold(keys: list[str], deadline: float) -> str:
            try:
                async with slots.hold(keys, deadline):
                    await release.wait()
                    return "ok"
            except Unavailable as exc:
                return exc.reason

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 0.2
        noisy = [asyncio.create_task(hold(["peer:a"], deadline)) for _ in range(6)]
        await looptime.advance(0.05)
        assert slots.held_by("peer:a") == 2
        quiet = [asyncio.create_task(hold([f"peer:{i}"], deadline)) for i in range(5)]
        await looptime.advance(0.3)  # past the deadline: the noisy extras gave up
        release.set()
        return await asyncio.gather(*noisy), await asyncio.gather(*quiet)

    noisy_results, quiet_results = looptime.run(main())
    assert sorted(noisy_results) == ["caller_saturated"] * 4 + ["ok"] * 2
    assert quiet_results == ["ok"] * 5
    assert len(slots) == 0  # every caller forgotten once idle
