"""TokenAuth: bearer on every request, one retry with a fresh token on a 401."""

from __future__ import annotations

import httpx
import pytest

from cp_token.client import TokenAuth, TokenSource
from cp_token.runtime.clock import FakeClock
from tests.fakes.client import Script, ok, options

SIDECAR = "http://127.0.0.1:8099/token"


class API:
    """A protected API accepting only the bearer tokens in ``accepted``."""

    def __init__(self, *accepted: str) -> None:
        self.accepted = set(accepted)
        self.seen: list[tuple[str | None, bytes]] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.headers.get("Authorization"), request.content))
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return httpx.Response(200 if bearer in self.accepted else 401)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_adds_the_bearer(clock: FakeClock) -> None:
    tokens = Script(ok("t1"))
    api = API("t1")
    source = TokenSource(sidecar_url=SIDECAR, **options(clock, tokens))
    with httpx.Client(auth=TokenAuth(source), transport=httpx.MockTransport(api.handle)) as c:
        assert c.get("https://api.example/v1/sessions").status_code == 200
        assert c.get("https://api.example/v1/sessions").status_code == 200
    assert [s[0] for s in api.seen] == ["Bearer t1", "Bearer t1"]
    assert tokens.count == 1  # cached


def test_a_401_is_retried_once_with_a_fresh_token(clock: FakeClock) -> None:
    tokens = Script(ok("revoked"), ok("t2"))
    api = API("t2")
    source = TokenSource(sidecar_url=SIDECAR, **options(clock, tokens))
    with httpx.Client(auth=TokenAuth(source), transport=httpx.MockTransport(api.handle)) as c:
        response = c.post("https://api.example/v1/sessions", content=b"payload")
    assert response.status_code == 200
    assert api.seen == [("Bearer revoked", b"payload"), ("Bearer t2", b"payload")]
    assert [r.method for r in tokens.requests] == ["GET", "POST"]  # POST forces the sidecar


def test_a_second_401_is_returned_not_retried_again(clock: FakeClock) -> None:
    tokens = Script(ok("t1"), ok("t2"), ok("t3"))
    api = API()  # accepts nothing
    source = TokenSource(sidecar_url=SIDECAR, **options(clock, tokens))
    with httpx.Client(auth=TokenAuth(source), transport=httpx.MockTransport(api.handle)) as c:
        response = c.get("https://api.example/v1/sessions")
    assert response.status_code == 401
    assert len(api.seen) == 2


def test_no_retry_when_the_source_has_no_other_token() -> None:
    api = API()
    source = TokenSource(static_token="dev")
    with httpx.Client(auth=TokenAuth(source), transport=httpx.MockTransport(api.handle)) as c:
        assert c.get("https://api.example/").status_code == 401
    assert len(api.seen) == 1


async def test_async_flow_retries_once(clock: FakeClock) -> None:
    tokens = Script(ok("revoked"), ok("t2"))
    api = API("t2")
    source = TokenSource(sidecar_url=SIDECAR, **options(clock, tokens))
    async with httpx.AsyncClient(
        auth=TokenAuth(source), transport=httpx.MockTransport(api.handle)
    ) as c:
        response = await c.put("https://api.example/v1/x", content=b"body")
    assert response.status_code == 200
    assert api.seen == [("Bearer revoked", b"body"), ("Bearer t2", b"body")]


async def test_async_second_401_is_returned(clock: FakeClock) -> None:
    tokens = Script(ok("t1"), ok("t2"), ok("t3"))
    api = API()
    source = TokenSource(sidecar_url=SIDECAR, **options(clock, tokens))
    async with httpx.AsyncClient(
        auth=TokenAuth(source), transport=httpx.MockTransport(api.handle)
    ) as c:
        assert (await c.get("https://api.example/")).status_code == 401
    assert len(api.seen) == 2
