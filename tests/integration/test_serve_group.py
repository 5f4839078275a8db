"""`ServerGroup`, the one run loop of the CP, the sidecar and the injector, in this process
on real loopback sockets: exit codes, signals (a second one included), a failed start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette

from cp_token.http.serving import EdgeServer, ServerGroup, bind_listener, edge_server


class Lifespan:
    """An app whose lifespan records that it ran to the end (or fails to start)."""

    def __init__(self, fail_start: bool = False) -> None:
        self.stopped = False
        self.fail_start = fail_start
        self.app = Starlette(lifespan=self.lifespan)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.fail_start:
            raise RuntimeError("cannot start")
        yield
        self.stopped = True


async def started(*servers: EdgeServer) -> None:
    deadline = time.monotonic() + 10
    while not all(s.started for s in servers):
        assert time.monotonic() < deadline, "servers did not start"
        await asyncio.sleep(0.01)


def pairs_of(*apps: Starlette) -> list[tuple[EdgeServer, socket.socket]]:
    return [
        (
            edge_server(app, lifespan="on" if i == 0 else "off", graceful_seconds=5),
            bind_listener("127.0.0.1", 0, max_connections=16),
        )
        for i, app in enumerate(apps)
    ]


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT], [signal.SIGINT] * 2])
async def test_signals_stop_every_server_with_exit_0_and_a_clean_shutdown(
    signals: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    """A second signal stops waiting for connections, and still stops the app in order
    (uvicorn alone skips the lifespan shutdown then: a CancelledError logged at error)."""
    life = Lifespan()
    group, pairs = ServerGroup(), pairs_of(life.app, Starlette())
    servers = [server for server, _ in pairs]
    run = asyncio.create_task(group.serve(*pairs))
    await started(*servers)
    for sig in signals:
        os.kill(os.getpid(), sig)
        await asyncio.sleep(0)
    assert await asyncio.wait_for(run, 15) == 0
    assert life.stopped
    assert all(s.force_exit == (len(signals) > 1) for s in servers)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_stop_1_is_exit_1() -> None:
    group, pairs = ServerGroup(), pairs_of(Lifespan().app, Starlette())
    run = asyncio.create_task(group.serve(*pairs))
    await started(*(server for server, _ in pairs))
    group.stop(1)
    group.stop(0)  # a later signal does not lower it
    assert await asyncio.wait_for(run, 15) == 1


async def test_a_server_that_fails_to_start_stops_the_others_with_exit_1() -> None:
    group, pairs = ServerGroup(), pairs_of(Lifespan(fail_start=True).app, Starlette())
    assert await asyncio.wait_for(group.serve(*pairs), 15) == 1
    assert not pairs[0][0].started
    assert pairs[1][0].should_exit
