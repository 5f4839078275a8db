"""The oidc minter against the fake IdP: one upstream call for concurrent callers, never less
than the minimum lifetime, an outage served from the cache then 503, invalid_client as a
readiness problem, absurd lifetimes, the refresh schedule.

Named after cp_token/minters/oidc.py with a suffix while tests/unit/minters/test_oidc.py is
being rewritten: fold these into it."""

from __future__ import annotations

import asyncio
import random

import pytest

from cp_token.errors import Unavailable
from cp_token.identity import Identity
from cp_token.minters.oidc import OidcMinter
from cp_token.runtime.clock import FakeClock
from tests.fakes.idp import FakeIdP

WHO = Identity("system:serviceaccount:ns:session-1-sa")


def oidc(idp: FakeIdP, clock: FakeClock, min_ttl: float = 300, **kw: object) -> OidcMinter:
    return OidcMinter(
        token_url=idp.token_url,
        client_id=idp.client_id,
        client_secret=lambda: idp.client_secret,
        min_ttl=min_ttl,
        clock=clock,
        rng=random.Random(1),
        **kw,  # type: ignore[arg-type]
    )


async def test_oidc_one_upstream_call_for_concurrent_callers(idp: FakeIdP) -> None:
    clock = FakeClock()
    idp.set_latency(0.2)
    m = oidc(idp, clock, scope="api", audience="https://api.example")
    try:
        results = await asyncio.gather(*(m.mint(WHO) for _ in range(50)))
        assert idp.calls() == 1
        assert len({r.token for r in results}) == 1
        assert idp.is_issued(results[0].token)
        assert results[0].expires_at == pytest.approx(clock.time() + 3600)
        form = idp.last_form
        assert form is not None
        assert form["grant_type"] == "client_credentials"
        assert form["scope"] == "api" and form["audience"] == "https://api.example"
        assert idp.last_auth_method == "client_secret_basic"
        # cached: no further upstream call while min_ttl is satisfied
        clock.advance(3000)
        await m.mint(WHO)
        assert idp.calls() == 1
    finally:
        await m.aclose()


async def test_oidc_never_hands_out_less_than_min_ttl(idp: FakeIdP) -> None:
    clock = FakeClock()
    m = oidc(idp, clock)
    try:
        first = await m.mint(WHO)
        clock.advance(3600 - 299)  # 299 s left < 300
        second = await m.mint(WHO)
        assert second.token != first.token and idp.calls() == 2
        assert second.expires_at is not None
        assert second.expires_at - clock.time() >= 300
    finally:
        await m.aclose()


async def test_oidc_idp_outage_serves_cache_then_503(idp: FakeIdP) -> None:
    clock = FakeClock()
    m = oidc(idp, clock)
    try:
        tok = await m.mint(WHO)
        idp.fail("500")
        clock.advance(3000)  # 600 s left: still satisfies min_ttl, served from cache
        assert (await m.mint(WHO)).token == tok.token
        clock.advance(301)  # 299 s left: must refresh, IdP down -> 503
        with pytest.raises(Unavailable) as info:
            await m.mint(WHO)
        assert info.value.status == 503
        assert m.problem is None  # a transient outage never makes the replica unready
        idp.fail(None)
        clock.advance(30)  # past the backoff (the next IdP call waits it out)
        assert (await m.mint(WHO)).token != tok.token
    finally:
        await m.aclose()


async def test_oidc_invalid_client_is_a_readiness_problem(idp: FakeIdP) -> None:
    clock = FakeClock()
    m = OidcMinter(
        token_url=idp.token_url,
        client_id=idp.client_id,
        client_secret=lambda: "wrong",
        min_ttl=300,
        clock=clock,
    )
    try:
        with pytest.raises(Unavailable):
            await m.mint(WHO)
        assert m.problem == "invalid_client"  # a reason class: the probe port shows it
    finally:
        await m.aclose()


async def test_oidc_short_lived_upstream_is_refused(idp: FakeIdP) -> None:
    idp.set_expires_in(200)
    m = oidc(idp, FakeClock())
    try:
        with pytest.raises(Unavailable) as info:
            await m.mint(WHO)
        assert info.value.reason == "idp_short_lived"
    finally:
        await m.aclose()


@pytest.mark.parametrize("expires_in", [10**17, 10**300])
async def test_oidc_upstream_lifetime_of_centuries_is_a_bad_answer(
    idp: FakeIdP, expires_in: int
) -> None:
    idp.set_expires_in(expires_in)
    m = oidc(idp, FakeClock())
    try:
        with pytest.raises(Unavailable) as info:  # not an OverflowError turned 503 internal
            await m.mint(WHO)
        assert info.value.reason == "idp_unavailable"
    finally:
        await m.aclose()


async def test_oidc_refresh_schedule(idp: FakeIdP) -> None:
    clock = FakeClock()
    m = oidc(idp, clock)
    try:
        assert m.next_refresh_in() == 0  # nothing held: fetch now
        await m.mint(WHO)
        # usable window = 3600 - 300; refresh halfway through it
        assert m.next_refresh_in() == pytest.approx(1650)
        clock.advance(1000)
        assert m.next_refresh_in() == pytest.approx(650)
        idp.fail("500")
        clock.advance(3600)  # the token is gone and every call fails: the backoff paces them
        for failures, cap in [(1, 1), (3, 4), (10, 30)]:
            while m.fetches < 1 + failures:
                clock.advance(m.next_refresh_in())
                with pytest.raises(Unavailable):
                    await m.mint(WHO)
            assert 0 < m.next_refresh_in() <= cap
    finally:
        await m.aclose()
