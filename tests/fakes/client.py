"""Scripted token endpoints for the client and sidecar unit tests (no network)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import httpx

from cp_token.runtime.clock import FakeClock


def token_body(token: str, expires_in: int | None = 900) -> dict[str, Any]:
    """The CP's 200 JSON."""
    expires_at = None if expires_in is None else "2027-01-15T08:15:00Z"
    return {
        "token": token,
        "token_type": "Bearer",
        "expires_at": expires_at,
        "expires_in": expires_in,
    }


def ok(token: str, expires_in: int | None = 900) -> httpx.Response:
    return httpx.Response(
        200, json=token_body(token, expires_in), headers={"Cache-Control": "no-store"}
    )


def refused(status: int, description: str) -> httpx.Response:
    error = "invalid_token" if status == 401 else "access_denied"
    return httpx.Response(status, json={"error": error, "error_description": description})


def unavailable(status: int = 503, retry_after: str | None = None) -> httpx.Response:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    error = "rate_limited" if status == 429 else "temporarily_unavailable"
    return httpx.Response(
        status, json={"error": error, "error_description": "try later"}, headers=headers
    )


Step = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


class Script:
    """A token endpoint that answers with the given steps in order (the last one repeats),
    recording every request. Optionally waits on ``gate`` (async) before answering."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []
        self.gate: asyncio.Event | None = None

    def _next(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, Exception):
            raise step
        if isinstance(step, httpx.Response):
            return step
        return step(request)

    def sync(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._next)

    def async_(self) -> httpx.MockTransport:
        async def handler(request: httpx.Request) -> httpx.Response:
            if self.gate is not None:
                await self.gate.wait()
            return self._next(request)

        return httpx.MockTransport(handler)

    @property
    def count(self) -> int:
        return len(self.requests)


def options(clock: FakeClock, script: Script, **extra: Any) -> dict[str, Any]:
    """SourceOptions wiring a fake clock, seeded jitter and the scripted transports."""
    return {
        "clock": clock,
        "rand": random.Random(7).random,
        "transport": script.sync(),
        "async_transport": script.async_(),
        **extra,
    }
