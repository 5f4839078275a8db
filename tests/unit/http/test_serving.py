"""``ServerGroup``: the CP's and the injector's servers run and stop together."""

from __future__ import annotations

import asyncio

import uvicorn
from starlette.applications import Starlette

from cp_token.http.serving import QuietSignalsServer, ServerGroup, bind_listener


def server() -> QuietSignalsServer:
    config = uvicorn.Config(Starlette(), lifespan="off", log_config=None, access_log=False)
    return QuietSignalsServer(config)


async def wait_started(*servers: QuietSignalsServer) -> None:
    for _ in range(500):  # bounded: 5 s
        if all(s.started for s in servers):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("servers did not start")


async def test_stop_with_a_code_stops_every_server_and_is_the_exit_code() -> None:
    group = ServerGroup()
    api, metrics = server(), server()
    pairs = ((api, bind_listener("127.0.0.1", 0)), (metrics, bind_listener("127.0.0.1", 0)))
    serving = asyncio.create_task(group.serve(*pairs))
    await wait_started(api, metrics)
    group.stop(1)  # a background task died
    assert await asyncio.wait_for(serving, 10) == 1
    assert api.should_exit and metrics.should_exit


async def test_a_second_stop_forces_exit() -> None:
    group = ServerGroup()
    api = server()
    serving = asyncio.create_task(group.serve((api, bind_listener("127.0.0.1", 0))))
    await wait_started(api)
    group.stop(0)
    assert not api.force_exit
    group.stop(0)
    assert api.force_exit
    assert await asyncio.wait_for(serving, 10) == 0


async def test_a_stop_before_serving_is_kept() -> None:
    group = ServerGroup()
    group.stop(1)
    api = server()
    code = await asyncio.wait_for(group.serve((api, bind_listener("127.0.0.1", 0))), 10)
    assert code == 1
