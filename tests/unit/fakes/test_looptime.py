"""The virtual-time loop: timers fire in order at their virtual time, take no wall-clock time,
deadlines (``asyncio.timeout``, ``wait_for``) hold exactly, and loopback sockets still work."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.fakes import looptime


def test_an_hour_of_timers_takes_no_time_and_fires_in_order() -> None:
    fired: list[tuple[str, float]] = []

    async def main() -> float:
        loop = asyncio.get_running_loop()

        async def at(name: str, delay: float) -> None:
            await looptime.advance(delay)
            fired.append((name, loop.time()))

        await asyncio.gather(at("late", 3600), at("early", 0.25), at("middle", 60))
        return loop.time()

    wall = time.monotonic()
    assert looptime.run(main()) == 3600
    assert time.monotonic() - wall < 1.0
    assert fired == [("early", 0.25), ("middle", 60), ("late", 3600)]


def test_deadlines_hold_exactly() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.65):
                await asyncio.Event().wait()
        first = loop.time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), 0.35)
        return first, loop.time()

    assert looptime.run(main()) == (0.65, 1.0)


def test_loopback_sockets_work_on_virtual_time() -> None:
    async def main() -> bytes:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping\n")
        answer = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        server.close()
        await server.wait_closed()
        return answer

    assert looptime.run(main()) == b"ping\n"


async def test_advance_refuses_a_real_loop() -> None:
    with pytest.raises(RuntimeError, match="virtual time"):
        await looptime.advance(1)
