"""The CP's app in-process over a dict-backed reviewer, on the fake clock, for unit tests.

Both doors (``GET /token`` in tests/unit/test_app.py, ``POST /oauth2/token`` in
tests/unit/test_exchange.py) are built by :func:`build` around one reviewer table, so they are
checked against one pipeline: same identities, same rate-limit bucket, same audit schema.
Import the ``clock`` and ``reviewer`` fixtures from here into a test module to use them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from cp_token.app import create_app
from cp_token.authn.cache import CachedAuthenticator
from cp_token.errors import Unauthenticated
from cp_token.identity import POD_NAME_KEY, POD_UID_KEY, Identity
from cp_token.minters.jwt import JwtMinter
from cp_token.policy import RunnerPolicy
from cp_token.ratelimit import RateLimiter
from cp_token.runtime.clock import FakeClock

__all__ = ["BOUND", "RUNNER", "TABLE", "DictReviewer", "build", "call", "clock", "reviewer"]

RUNNER = "system:serviceaccount:session-a:session-abc-sa"
BOUND = {POD_NAME_KEY: ("runner-abc",), POD_UID_KEY: ("uid-1",)}


class DictReviewer:
    """A reviewer with a fixed table of tokens; counts calls; can be made to fail.

    ``gate``: when set to an Event, every review waits for it (after counting the call), so a
    test can hold reviews in flight and see how many started.
    """

    def __init__(self, table: dict[str, Identity]) -> None:
        self.table = table
        self.calls = 0
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def review(self, token: str) -> Identity:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        if token not in self.table:
            raise Unauthenticated("unknown token", reason="not_authenticated")
        return self.table[token]

    async def aclose(self) -> None:
        pass


TABLE = {
    "good": Identity(RUNNER, extra=BOUND),
    "unbound": Identity(RUNNER),
    "other-sa": Identity("system:serviceaccount:session-a:default", extra=BOUND),
}


def build(clock: FakeClock, reviewer: DictReviewer, **kw: Any) -> tuple[Any, JwtMinter]:
    """The CP's app (review cache of 30 s, 4 reviews in flight, no JWT precheck) and its
    minter. ``kw``: ``minter``, ``queue_wait``, ``rate``, ``burst``, ``exchange``."""
    minter = kw.pop("minter", None) or JwtMinter(
        issuer="https://cp.test", audience="ambient-api-server", ttl=900, clock=clock
    )
    auth = CachedAuthenticator(
        reviewer,
        clock=clock,
        audiences=("ambient-cp",),
        ttl=30,
        max_in_flight=4,
        jwt_precheck=False,
        queue_wait=kw.pop("queue_wait", 2.0),
    )
    app = create_app(
        authenticator=auth,
        policy=RunnerPolicy(),
        minter=minter,
        clock=clock,
        limiter=RateLimiter(kw.pop("rate", 5.0), kw.pop("burst", 20), clock),
        exchange=kw.pop("exchange", None),
    )
    return app, minter


@pytest.fixture
def clock() -> FakeClock:
    """A fresh fake clock."""
    return FakeClock()


@pytest.fixture
def reviewer() -> DictReviewer:
    """A reviewer over a copy of :data:`TABLE`."""
    return DictReviewer(dict(TABLE))


async def call(
    app: Any, method: str = "GET", headers: dict[str, str] | None = None, path: str = "/token"
) -> httpx.Response:
    """One request to ``app`` over ASGI."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
        return await client.request(method, path, headers=headers or {})
