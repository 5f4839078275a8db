"""Reading a request body at the edge, straight from ASGI messages: refused (413) as soon as
it is known to be over the limit, without reading the rest; a body that stops arriving is a
400 once ``BODY_TIMEOUT`` has passed; a client gone mid-body is a 400, never a 500."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import Request

from cp_token.errors import InvalidRequest, PayloadTooLarge
from cp_token.http import bodies
from cp_token.http.bodies import read_body


class Body:
    """An ASGI ``receive`` handing out ``chunks``, then either more of nothing (``stall``)
    or a disconnect; counts what was asked for."""

    def __init__(self, chunks: list[bytes], *, stall: bool = False, cut: bool = False) -> None:
        self.messages: list[dict[str, Any]] = [
            {"type": "http.request", "body": c, "more_body": stall or cut or i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ]
        self.stall = stall
        self.received = 0

    async def __call__(self) -> dict[str, Any]:
        if self.received < len(self.messages):
            self.received += 1
            return self.messages[self.received - 1]
        if self.stall:
            await asyncio.Event().wait()  # a client that never sends the rest
        return {"type": "http.disconnect"}


def request(receive: Body, content_length: int | None = None) -> Request:
    headers = [] if content_length is None else [(b"content-length", b"%d" % content_length)]
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    return Request(scope, receive)


async def test_one_chunk_comes_back_as_it_is_and_several_are_joined() -> None:
    assert await read_body(request(Body([b"grant_type=x"])), 100) == b"grant_type=x"
    assert await read_body(request(Body([b"a", b"", b"bc"])), 100) == b"abc"
    assert await read_body(request(Body([b"x" * 100])), 100) == b"x" * 100  # at the limit


async def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    receive = Body([b"x" * 10])
    with pytest.raises(PayloadTooLarge) as info:
        await read_body(request(receive, content_length=101), 100)
    assert receive.received == 0
    assert info.value.status == 413 and info.value.headers() == {"Connection": "close"}
    assert "100 bytes" in info.value.description


async def test_an_undeclared_body_is_abandoned_at_the_chunk_that_crosses_the_limit() -> None:
    receive = Body([b"x" * 40] * 10)
    with pytest.raises(PayloadTooLarge):
        await read_body(request(receive), 100)
    assert receive.received == 3  # 40, 80, 120: the rest is never read


async def test_a_client_gone_mid_body_is_a_400() -> None:
    with pytest.raises(InvalidRequest) as info:
        await read_body(request(Body([b"gra"], cut=True)), 100)
    assert info.value.status == 400 and info.value.reason == "client_disconnect"


async def test_a_body_that_stops_arriving_is_a_400_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The timeout is the event loop's: set to 0, the first wait for more body ends it."""
    monkeypatch.setattr(bodies, "BODY_TIMEOUT", 0)
    receive = Body([b"grant_type="], stall=True)
    with pytest.raises(InvalidRequest) as info:
        await read_body(request(receive), 100)
    assert info.value.reason == "body_timeout" and receive.received == 1
    assert "did not arrive within 0 s" in info.value.description
