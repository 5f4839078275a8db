"""The static minter: the configured token's expiry read from it (a JWT) or null (opaque), and a
token with less than CP_TOKEN_MIN_TTL left never handed out."""

from __future__ import annotations

import json

import pytest

from cp_token.errors import Unavailable
from cp_token.identity import Identity
from cp_token.minters.jwt import JwtMinter
from cp_token.minters.signer import b64url
from cp_token.minters.static import StaticMinter
from cp_token.runtime.clock import FakeClock

WHO = Identity("system:serviceaccount:ns:session-1-sa")


async def test_static_minter_expiry_from_jwt_or_null() -> None:
    opaque = await StaticMinter(token="opaque").mint(WHO)
    assert opaque.expires_at is None
    clock = FakeClock()
    j = JwtMinter(issuer="https://cp", audience="x", ttl=900, clock=clock)
    as_static = await StaticMinter(token=(await j.mint(WHO)).token).mint(WHO)
    assert as_static.expires_at == clock.time() + 900


def _static_jwt(exp: float) -> str:
    return f"eyJhbGciOiJub25lIn0.{b64url(json.dumps({'exp': exp}).encode()).decode()}.c2ln"


async def test_static_token_with_less_than_min_ttl_left_is_not_handed_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    minter = StaticMinter(token=_static_jwt(clock.time() + 400), min_ttl=300, clock=clock)
    assert (await minter.mint(WHO)).expires_at == clock.time() + 400
    clock.advance(101)  # 299 s left
    for _ in range(3):
        with pytest.raises(Unavailable) as info:
            await minter.mint(WHO)
        assert info.value.reason == "static_short_lived"
        assert info.value.status == 503
    logged = [r for r in caplog.records if "CP_TOKEN_MIN_TTL" in r.getMessage()]
    assert len(logged) == 1  # once per token, not per request
    expired = StaticMinter(token=_static_jwt(clock.time() - 3600), min_ttl=300, clock=clock)
    with pytest.raises(Unavailable):
        await expired.mint(WHO)
    opaque = StaticMinter(token="opaque", min_ttl=300, clock=clock)  # no exp: nothing to check
    assert (await opaque.mint(WHO)).expires_at is None
