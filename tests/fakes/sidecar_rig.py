"""The sidecar app wired to a scripted fake CP, on a fake clock, for ASGI unit tests."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx

from cp_token.client import TokenSource
from cp_token.runtime.clock import FakeClock
from sidecar.app import create_app
from sidecar.holder import TokenHolder
from sidecar.metrics import SidecarMetrics
from sidecar.refresher import Refresher
from sidecar.sink import TokenFileSink
from tests.fakes.client import Script

CP_URL = "http://cp.example.svc:8080/token"
HEADER = {"Ambient-Token-Request": "true"}


class ManualClock(FakeClock):
    """A fake clock whose ``sleep`` never ends by itself: the refresh loop then only moves
    when a fetch completes, and the test moves time with ``advance``."""

    async def sleep(self, seconds: float) -> None:
        await asyncio.Event().wait()


class Rig:
    """holder + refresher + app over ``cp`` (a Script answering as the CP)."""

    def __init__(
        self,
        cp: Script,
        tmp_path: Path,
        *,
        clock: FakeClock | None = None,
        token_file: Path | None = None,
        fatal: list[BaseException] | None = None,
    ) -> None:
        sa = tmp_path / "sa-token"
        sa.write_text("sa-token")
        self.cp = cp
        self.clock = clock or FakeClock()
        self.source = TokenSource(
            cp_url=CP_URL,
            sa_token_file=str(sa),
            clock=self.clock,
            rand=random.Random(5).random,
            async_transport=cp.async_(),
        )
        self.holder = TokenHolder(self.clock, rand=random.Random(11).random)
        self.metrics = SidecarMetrics(self.holder)
        sink = None if token_file is None else TokenFileSink(str(token_file))
        self.refresher = Refresher(
            self.source, self.holder, self.clock, metrics=self.metrics, sink=sink
        )
        self.app = create_app(
            self.refresher,
            metrics=self.metrics,
            min_ttl=60,
            on_fatal=None if fatal is None else fatal.append,
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://127.0.0.1:8099"
        )

    async def get(self, path: str = "/token", **kw: object) -> httpx.Response:
        headers = {**HEADER, **kw.pop("headers", {})}  # type: ignore[dict-item]
        return await self.client.get(path, headers=headers, **kw)  # type: ignore[arg-type]

    async def post(self, path: str = "/token", **kw: object) -> httpx.Response:
        headers = {**HEADER, **kw.pop("headers", {})}  # type: ignore[dict-item]
        return await self.client.post(path, headers=headers, **kw)  # type: ignore[arg-type]
