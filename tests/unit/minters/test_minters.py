"""Minters: oidc against the fake IdP (singleflight, min TTL, outage, invalid_client), jwt keys
and rotation, static tokens."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import KeySet

from cp_token.errors import Unavailable
from cp_token.identity import Identity
from cp_token.minters.jwt import JwtMinter, load_keyring, session_id_of
from cp_token.minters.oidc import OidcMinter
from cp_token.minters.signer import b64url
from cp_token.minters.static import StaticMinter
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


async def test_oidc_background_refresh_keeps_requests_off_the_idp(idp: FakeIdP) -> None:
    """With a short lifetime the background task refreshes before requests need it."""
    idp.set_expires_in(4)
    from cp_token.runtime.clock import SystemClock

    m = oidc(idp, SystemClock(), min_ttl=1)  # type: ignore[arg-type]
    task = asyncio.create_task(m.run())
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while idp.calls() < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert idp.calls() >= 3  # refreshed ahead of expiry, repeatedly, with no request
        tok = await m.mint(WHO)
        assert tok.expires_at is not None
    finally:
        task.cancel()
        await m.aclose()


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_keyring_loads_ec_and_rsa_and_rejects_others() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ring = load_keyring(_pem(ec_key) + b"\n" + _pem(rsa_key))
    assert [k.alg for k in ring.keys] == ["ES256", "RS256"]
    assert ring.signer.alg == "ES256"
    with pytest.raises(ValueError, match="P-256"):
        load_keyring(_pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(ValueError, match="no PEM"):
        load_keyring(b"hello")


async def test_jwt_rotation_publishes_all_signs_with_first() -> None:
    clock = FakeClock()
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    m = JwtMinter(issuer="https://cp", audience="api", ttl=900, clock=clock, key_pem=_pem(old))
    t_old = (await m.mint(WHO)).token
    old_kid = m.jwks()["keys"][0]["kid"]
    m.reload(_pem(old) + _pem(new))  # step 1: publish the new key
    assert len(m.jwks()["keys"]) == 2
    m.reload(_pem(new) + _pem(old))  # step 2: sign with it
    t_new = (await m.mint(WHO)).token
    keys = KeySet.import_key_set(m.jwks())
    assert jwt.decode(t_old, keys).header["kid"] == old_kid
    assert jwt.decode(t_new, keys).header["kid"] != old_kid
    m.reload(b"garbage")  # a bad rotation keeps the last good keys
    assert m.problem is None and len(m.jwks()["keys"]) == 2


def test_jwt_kid_is_the_rfc7638_thumbprint_so_replicas_agree() -> None:
    pem = _pem(ec.generate_private_key(ec.SECP256R1()))
    a = JwtMinter(issuer="https://cp", audience="x", ttl=900, clock=FakeClock(), key_pem=pem)
    b = JwtMinter(issuer="https://cp", audience="x", ttl=900, clock=FakeClock(), key_pem=pem)
    assert a.jwks() == b.jwks()


def test_jwt_bad_key_is_a_readiness_problem() -> None:
    m = JwtMinter(issuer="https://cp", audience="x", ttl=900, clock=FakeClock(), key_pem=b"x")
    assert m.problem == "signing_key"  # a reason class; the variable is named in the log


async def test_jwt_without_key_is_503() -> None:
    m = JwtMinter(issuer="https://cp", audience="x", ttl=900, clock=FakeClock(), key_pem=b"x")
    with pytest.raises(Unavailable):
        await m.mint(WHO)


def test_session_id() -> None:
    assert session_id_of("session-abc-123-sa") == "abc-123"
    assert session_id_of("default") is None


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


async def test_jwt_issuer_is_kept_exactly_as_configured() -> None:
    m = JwtMinter(issuer="https://iss.example/a/", audience="x", ttl=900, clock=FakeClock())
    token = (await m.mint(WHO)).token
    claims = jwt.decode(token, KeySet.import_key_set(m.jwks())).claims
    assert claims["iss"] == "https://iss.example/a/"
    assert m.openid_configuration()["issuer"] == "https://iss.example/a/"
    assert m.jwks_uri == "https://iss.example/a/.well-known/jwks.json"


async def test_jwt_a_forced_refresh_five_seconds_later_gets_a_new_token() -> None:
    # SPEC: the sidecar's `POST /token` "forces a fresh token" and may ask the CP again 5 s
    # after its last fetch (sealed mode: a 401 from an upstream, at most one fetch per 5 s).
    # The minter's reuse of a caller's last token must end before that, or the consumer whose
    # token was just rejected gets the very same token back.
    clock = FakeClock()
    m = JwtMinter(issuer="https://cp", audience="api", ttl=900, clock=clock)
    who = Identity(
        "system:serviceaccount:ns:session-1-sa",
        extra={
            "authentication.kubernetes.io/pod-name": ("runner-1",),
            "authentication.kubernetes.io/pod-uid": ("u1",),
        },
    )
    first = await m.mint(who)
    clock.advance(5.0)
    again = await m.mint(who)
    assert again.token != first.token and again.jti != first.jti
