"""The sidecar's app in sealed mode over a scripted CP and a recording upstream, for ASGI unit
tests: the HTTP egress (sidecar/egress.py) answers through a fake pool, so every call the
upstream got is kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import httpx

from sidecar.app import create_app
from sidecar.bearer import HeldBearer
from sidecar.egress import EgressApp, Upstream
from sidecar.egress_pool import Origin, UpstreamError
from sidecar.sealed import ProxyMetrics, sealed_token_endpoint
from tests.fakes.client import Script
from tests.fakes.sidecar_rig import HEADER, Rig

BASE = "https://api.example/v1"


def answer(status: int, headers: dict[str, str] | None = None, **kw: object) -> httpx.Response:
    """A response as a real transport hands it over: its body still to be streamed."""
    built = httpx.Response(status, headers=headers, **kw)  # type: ignore[arg-type]
    return httpx.Response(status, headers=built.headers, stream=httpx.ByteStream(built.content))


class Upstream401:
    """A recording upstream: answers by path, and 401 to the tokens in ``revoked``."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []
        self.revoked: set[str] = set()
        self.gate: asyncio.Event | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        self.requests.append(request)
        self.bodies.append(body)
        if self.gate is not None:
            await self.gate.wait()
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token in self.revoked:
            return answer(401, json={"error": "invalid_token"})
        path = request.url.raw_path.partition(b"?")[0].decode()
        if path.endswith("/moved"):
            return answer(302, headers={"Location": "https://login.example/x"})
        if path.endswith("/echo"):
            return answer(
                200, headers={"X-Echo": request.headers.get("authorization", "")}, content=b"e"
            )
        if path.endswith("/weird"):
            return answer(999, content=b"?")
        if path.endswith("/down"):
            raise UpstreamError("cannot connect (Connection refused)")
        return answer(
            200,
            headers={"X-Upstream": "yes", "Set-Cookie": "a=1"},
            json={"path": path, "query": request.url.query.decode(), "size": len(body)},
        )


class FakeResponse:
    """What :class:`UpstreamPool` hands back, from a whole answer."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], content: bytes) -> None:
        self.status = status
        self.headers = headers
        self._content = content
        self.closed = False
        self.finished = False

    async def body(self) -> AsyncIterator[bytes]:
        if self._content:
            self.finished = True
            yield self._content

    def close(self) -> None:
        self.closed = True


class FakePool:
    """The egress's pool, answering through ``handler`` (an httpx-style recording upstream)."""

    def __init__(self, handler: Upstream401) -> None:
        self.handler = handler

    async def request(
        self,
        origin: Origin,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes],
    ) -> FakeResponse:
        content = body if isinstance(body, bytes) else b"".join([c async for c in body])
        url = f"{origin.scheme}://{origin.host_header.decode()}{target.decode()}"
        request = httpx.Request(
            method, url, headers=[(b"host", origin.host_header), *headers], content=content
        )
        response = await self.handler(request)
        return FakeResponse(response.status_code, response.headers.raw, await response.aread())

    async def aclose(self) -> None:
        pass


class SealedRig(Rig):
    """The sidecar's app in sealed mode, its upstream a recording mock."""

    def __init__(self, cp: Script, tmp_path: Path) -> None:
        super().__init__(cp, tmp_path)
        self.upstream = Upstream401()
        self.proxy_metrics = ProxyMetrics(["api"], None)
        self.rig_metrics = self.metrics
        self.metrics.add(self.proxy_metrics.family)
        egress = EgressApp(
            [Upstream.from_url("api", BASE)],
            HeldBearer(self.refresher, 60),
            self.proxy_metrics,
            FakePool(self.upstream),  # type: ignore[arg-type]
            timeout=5,
        )
        self.app = create_app(
            self.refresher,
            metrics=self.metrics,
            min_ttl=60,
            token_route=sealed_token_endpoint(self.metrics),
            prefixes={"/upstream/": egress},
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://127.0.0.1:8099"
        )

    async def call(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kw: object
    ) -> httpx.Response:
        return await self.client.request(
            method,
            path,
            headers={**HEADER, **(headers or {})},
            **kw,  # type: ignore[arg-type]
        )

    def tokens_sent(self) -> list[list[str]]:
        return [r.headers.get_list("authorization") for r in self.upstream.requests]
