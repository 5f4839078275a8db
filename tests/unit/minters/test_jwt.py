"""The jwt minter: ES256/RS256 keys from PEM, rotation (publish all, sign with the first), the RFC
7638 kid, the reuse window, claims."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import KeySet

from cp_token.errors import Unavailable
from cp_token.identity import POD_NAME_KEY, POD_UID_KEY, Identity
from cp_token.minters import MintOptions
from cp_token.minters.jwt import JwtMinter, load_keyring, new_jti, session_id_of
from cp_token.runtime.clock import FakeClock

RUNNER = "system:serviceaccount:session-a:session-abc-sa"


BOUND = {POD_NAME_KEY: ("runner-abc",), POD_UID_KEY: ("uid-1",)}


def minter(clock: FakeClock, ttl: float = 900, **kw: Any) -> JwtMinter:
    return JwtMinter(issuer="https://cp", audience="api", ttl=ttl, clock=clock, **kw)


async def test_a_caller_asking_again_at_once_gets_the_same_token() -> None:
    clock = FakeClock()
    m = minter(clock)
    assert m.reuse_window == 4.0  # REUSE_WINDOW (below 1 % of 900 s)
    who = Identity(RUNNER, extra=BOUND)
    first = await m.mint(who)
    clock.advance(4.0)
    assert await m.mint(Identity(RUNNER, extra=BOUND)) is first
    clock.advance(0.5)
    later = await m.mint(who)
    assert later.token != first.token and later.jti != first.jti


async def test_reuse_never_crosses_callers_pods_narrowing_or_keys() -> None:
    clock = FakeClock()
    m = minter(clock)
    who = Identity(RUNNER, extra=BOUND)
    first = await m.mint(who)
    other_pod = Identity(RUNNER, extra={POD_NAME_KEY: ("runner-2",), POD_UID_KEY: ("u2",)})
    assert (await m.mint(other_pod)).token != first.token
    assert (await m.mint(Identity(RUNNER))).token != first.token  # not pod-bound
    narrowed = await m.mint(who, MintOptions(audiences=("api",)))
    assert narrowed.token != first.token
    m.reload(m_key_pem())  # a new signing key: tokens carry its kid from now on
    assert (await m.mint(who)).token != first.token


def m_key_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


async def test_reuse_can_be_turned_off_and_short_lifetimes_reuse_little() -> None:
    clock = FakeClock()
    assert minter(clock, ttl=6).reuse_window == pytest.approx(0.06)
    m = minter(clock, reuse=False)
    who = Identity(RUNNER, extra=BOUND)
    assert (await m.mint(who)).token != (await m.mint(who)).token


def test_jti_is_a_version_4_uuid() -> None:
    values = {new_jti() for _ in range(1000)}
    assert len(values) == 1000
    for value in list(values)[:50]:
        parsed = uuid.UUID(value)
        assert parsed.version == 4 and str(parsed) == value


WHO = Identity("system:serviceaccount:ns:session-1-sa")


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


async def test_jwt_issuer_is_kept_exactly_as_configured() -> None:
    m = JwtMinter(issuer="https://iss.example/a/", audience="x", ttl=900, clock=FakeClock())
    token = (await m.mint(WHO)).token
    claims = jwt.decode(token, KeySet.import_key_set(m.jwks())).claims
    assert claims["iss"] == "https://iss.example/a/"
    assert m.openid_configuration()["issuer"] == "https://iss.example/a/"
    assert m.jwks_uri == "https://iss.example/a/.well-known/jwks.json"


async def test_a_forced_refresh_five_seconds_later_gets_a_new_token() -> None:
    """The sidecar's ``POST /token`` forces a fresh token and may ask the CP again 5 s after
    its last fetch (sealed mode: after an upstream 401, at most one fetch per 5 s): the
    minter's reuse of a caller's last token ends before that, or the consumer whose token was
    just rejected gets the very same token back."""
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
