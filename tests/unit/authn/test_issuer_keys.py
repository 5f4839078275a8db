"""The API server's issuer keys: verification through joserfc with an explicit algorithm
allowlist, a key set from upstream treated as untrusted input, and the re-reads (rotation,
failures) on the fake clock with a scripted key source."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey

from cp_token.authn.issuer_keys import (
    ALGORITHMS,
    IssuerKeys,
    parse_key_set,
    verifies,
)
from cp_token.authn.precheck import EXP_LEEWAY, precheck
from cp_token.errors import Unauthenticated
from cp_token.kube.client import KubeDown, KubeError, KubeUnavailable
from cp_token.runtime.clock import FakeClock
from tests.fakes.clock import SteppedClock

CLAIMS = {"aud": ["ambient-cp"], "sub": "system:serviceaccount:ns:session-a-sa", "exp": 2e9}


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def new_key(alg: str) -> RSAKey | ECKey:
    if alg.startswith(("RS", "PS")):
        return RSAKey.generate_key(2048, private=True)
    curve = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}[alg]
    return ECKey.generate_key(curve, private=True)


def signed(alg: str, key: RSAKey | ECKey, kid: str = "k1", claims: Any = None) -> str:
    payload = json.dumps(CLAIMS if claims is None else claims)
    return jws.serialize_compact({"alg": alg, "kid": kid}, payload, key, algorithms=[alg])


def public_jwk(key: RSAKey | ECKey, kid: str = "k1", **extra: Any) -> dict[str, Any]:
    return {**key.as_dict(private=False), "kid": kid, "use": "sig", **extra}


# --- the allowlist: what the API server signs with, nothing else ----------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "ES384", "ES512"])
def test_every_algorithm_the_api_server_signs_with_verifies(alg: str) -> None:
    key = new_key(alg)
    token = signed(alg, key)
    keys = parse_key_set({"keys": [public_jwk(key)]}).candidates("k1", alg)
    assert len(keys) == 1 and verifies(token, keys, alg)
    head, payload, signature = token.split(".")
    tampered = b64(json.dumps({**CLAIMS, "sub": "system:serviceaccount:ns:admin"}).encode())
    assert not verifies(f"{head}.{tampered}.{signature}", keys, alg)
    assert not verifies(f"{head}.{payload}.{signature[:-4]}", keys, alg)
    assert not verifies(f"{head}.{payload}.***", keys, alg)


def test_the_allowlist_is_the_api_server_s() -> None:
    # k8s.io/kubernetes pkg/serviceaccount: RS256 and ES256/384/512, nothing else
    assert ALGORITHMS == {"RS256", "ES256", "ES384", "ES512"}


@pytest.mark.parametrize("alg", ["PS256", "RS384", "RS512", "PS512"])
def test_a_valid_signature_of_another_rsa_algorithm_is_refused(alg: str) -> None:
    key = new_key(alg)
    token = signed(alg, key)
    key_set = parse_key_set({"keys": [public_jwk(key)]})
    assert key_set.candidates("k1", alg) == []
    every_key = list(key_set.by_kid.values())
    assert not verifies(token, every_key, alg)
    assert not verifies(token, every_key, "RS256")  # the header says otherwise


def test_hmac_with_the_public_key_as_secret_is_refused() -> None:
    """The classic confusion: HS256 keyed with the RSA public key's bytes."""
    key = new_key("RS256")
    jwk = public_jwk(key)
    head = b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
    body = b64(json.dumps(CLAIMS).encode())
    secret = json.dumps(jwk, sort_keys=True).encode()
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    token = f"{head}.{body}.{b64(mac)}"
    keys = list(parse_key_set({"keys": [jwk]}).by_kid.values())
    assert not verifies(token, keys, "HS256") and not verifies(token, keys, "RS256")


def test_alg_none_is_refused() -> None:
    key = new_key("RS256")
    head = b64(json.dumps({"alg": "none", "kid": "k1"}).encode())
    token = f"{head}.{b64(json.dumps(CLAIMS).encode())}."
    keys = list(parse_key_set({"keys": [public_jwk(key)]}).by_kid.values())
    assert not verifies(token, keys, "none") and not verifies(token, keys, "RS256")


def test_a_key_is_used_only_with_its_own_curve() -> None:
    p256, p384 = new_key("ES256"), new_key("ES384")
    token = signed("ES384", p384, kid="k1")
    key_set = parse_key_set({"keys": [public_jwk(p256, "k1")]})
    assert key_set.candidates("k1", "ES384") == []
    assert not verifies(token, list(key_set.by_kid.values()), "ES384")


# --- the key set is untrusted input -----------------------------------------------------------


def test_unusable_keys_are_skipped_and_named() -> None:
    good = new_key("ES256")
    jwk = public_jwk(good)
    rsa = new_key("RS256").as_dict(private=False)
    huge_n = b64(b"\xff" * 4096)  # a 32,768-bit modulus: its verification would cost seconds
    key_set = parse_key_set(
        {
            "keys": [
                jwk,
                {**jwk, "kid": "off-curve", "x": jwk["y"]},
                {"kty": "RSA", "kid": "bad-n", "n": "!!", "e": "AQAB"},
                {"kty": "RSA", "kid": "huge", "n": huge_n, "e": "AQAB"},
                {**rsa, "kid": "huge-e", "e": b64(b"\x01" * 64)},
                {**rsa, "kid": "enc", "use": "enc"},
                {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
                {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "AA"},
                {"kty": "RSA", "kid": "types", "n": 5, "e": ["x"]},
                "not a key",
                None,
            ]
        }
    )
    assert set(key_set.by_kid) == {"k1"}
    assert key_set.unusable_kids == {
        "off-curve", "bad-n", "huge", "huge-e", "enc", "hmac", "ed", "types"
    }  # fmt: skip


def test_private_members_are_never_imported() -> None:
    key = new_key("RS256")
    key_set = parse_key_set({"keys": [{**key.as_dict(private=True), "kid": "k1"}]})
    assert not key_set.by_kid["k1"].public.is_private


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=10,
)
MEMBERS = ["kty", "kid", "use", "alg", "crv", "n", "e", "x", "y", "d", "k"]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        JSON,
        st.lists(st.dictionaries(st.sampled_from(MEMBERS), JSON | st.sampled_from(["RSA", "EC"]))),
    )
)
def test_no_key_set_document_makes_parsing_raise(keys: Any) -> None:
    parsed = parse_key_set({"keys": keys})
    assert len(parsed.by_kid) + len(parsed.unnamed) <= 64


# --- the exp leeway is the API server's --------------------------------------------------------


def test_the_precheck_accepts_what_the_api_server_accepts_past_exp() -> None:
    now = 2_000_000_000.0
    head = b64(b'{"alg":"RS256"}')
    late = {**CLAIMS, "exp": now - 45}
    token = f"{head}.{b64(json.dumps(late).encode())}.c2ln"
    assert precheck(token, ("ambient-cp",), now).exp == now - 45  # 45 s past exp: accepted
    assert EXP_LEEWAY == 60.0
    too_late = {**CLAIMS, "exp": now - 61}
    token = f"{head}.{b64(json.dumps(too_late).encode())}.c2ln"
    with pytest.raises(Unauthenticated, match="expired"):
        precheck(token, ("ambient-cp",), now)


# --- the refresher: a bad answer is a failure, never an exception that escapes -----------------


class ScriptedKeys:
    """A KubeClient stand-in for ``get_json``: answers come from ``script`` in turn."""

    def __init__(self, *script: Callable[[], dict[str, Any]]) -> None:
        self.script = list(script)
        self.calls = 0

    async def get_json(
        self, call: str, path: str, accept: str = "application/json"
    ) -> dict[str, Any]:
        assert path == "/openid/v1/jwks"
        assert accept == "application/jwk-set+json"  # the real API server answers 406 otherwise
        step = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return step()


def answer(doc: Any) -> Callable[[], Any]:
    return lambda: doc


def fail(exc: KubeError) -> Callable[[], Any]:
    def raise_() -> Any:
        raise exc

    return raise_


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    "bad",
    [
        {"keys": "not a list"},
        {"keys": [{"kty": "RSA", "kid": "k1", "n": {"nested": [1]}, "e": 3}]},
        {"keys": [None, 5, "x", []]},
        {"nothing": True},
    ],
)
async def test_a_malformed_key_set_never_kills_the_refresher(bad: Any) -> None:
    clock = FakeClock()
    key = new_key("RS256")
    source = ScriptedKeys(answer({"keys": [public_jwk(key)]}), answer(bad))
    keys = IssuerKeys(source, clock)  # type: ignore[arg-type]
    assert len(await keys.lookup("k1", "RS256")) == 1
    clock.advance(301)  # past max age: a background re-read gets the malformed set
    assert keys.known("k1", "RS256") is not None  # answered from the held set meanwhile
    await settle()
    assert source.calls == 2 and keys.failure is not None
    assert keys.known("k1", "RS256") is not None  # the good set is kept
    clock.advance(301)
    keys.known("k1", "RS256")  # the refresher tries again later
    await settle()
    assert source.calls == 3
    await keys.aclose()


async def test_a_failed_read_is_a_kube_error_for_the_caller() -> None:
    clock = FakeClock()
    source = ScriptedKeys(answer({"keys": "garbage"}))
    keys = IssuerKeys(source, clock)  # type: ignore[arg-type]
    with pytest.raises(KubeUnavailable, match="no usable key"):
        await keys.lookup("k1", "RS256")
    await keys.aclose()


async def test_an_unexpected_error_in_a_background_refresh_is_contained() -> None:
    clock = FakeClock()
    key = new_key("ES256")

    def boom() -> Any:
        raise RuntimeError("a bug in a library")

    source = ScriptedKeys(answer({"keys": [public_jwk(key)]}), boom)
    keys = IssuerKeys(source, clock)  # type: ignore[arg-type]
    assert await keys.lookup("k1", "ES256")
    clock.advance(301)
    keys.known("k1", "ES256")
    await settle()
    assert source.calls == 2 and keys.keys is not None and "k1" in keys.keys.by_kid
    assert keys.failure == "jwks: the API server's key set could not be read (RuntimeError)"
    await keys.aclose()


# --- key rotation: an unknown kid re-reads at once, at most once a second ---------------------


class KeySource:
    """The API server's key set, changeable; ``hold`` keeps reads in flight until set."""

    def __init__(self, *keys: RSAKey | ECKey) -> None:
        self.published: list[dict[str, Any]] = [public_jwk(k, f"k{i}") for i, k in enumerate(keys)]
        self.calls = 0
        self.hold: asyncio.Event | None = None
        self.failing: KubeError | None = None

    def publish(self, key: RSAKey | ECKey, kid: str) -> None:
        self.published = [*self.published, public_jwk(key, kid)]

    async def get_json(
        self, call: str, path: str, accept: str = "application/json"
    ) -> dict[str, Any]:
        self.calls += 1
        doc = {"keys": list(self.published)}  # what the server holds as the read starts
        if self.hold is not None:
            await self.hold.wait()
        if self.failing is not None:
            raise self.failing
        return doc


async def test_an_unknown_kid_waits_for_a_re_read_instead_of_being_refused() -> None:
    """Before: a kid unseen within 10 s of the last read was refused (bad_signature, then
    remembered), so pods of a freshly published key were dark for up to a minute."""
    clock = SteppedClock()
    source = KeySource(new_key("RS256"))
    keys = IssuerKeys(source, clock)  # type: ignore[arg-type]
    assert await keys.lookup("k0", "RS256")
    rotated = new_key("ES256")
    source.publish(rotated, "k1")  # the API server rotates: the CP read its set just now
    lookup = asyncio.create_task(keys.lookup("k1", "ES256"))
    await settle()
    assert not lookup.done() and source.calls == 1  # at most one read a second
    clock.advance(1.0)
    found = await asyncio.wait_for(lookup, 5)
    assert len(found) == 1 and source.calls == 2
    token = signed("ES256", rotated, kid="k1")
    assert verifies(token, found, "ES256")
    await keys.aclose()


async def test_concurrent_unknown_kids_share_one_read_and_reads_stay_one_a_second() -> None:
    clock = SteppedClock()
    source = KeySource(new_key("RS256"))
    keys = IssuerKeys(source, clock)  # type: ignore[arg-type]
    await keys.lookup("k0", "RS256")
    pending = [asyncio.create_task(keys.lookup(f"forged-{i}", "RS256")) for i in range(200)]
    for _ in range(20):  # five seconds of forged kids arriving, a quarter second apart
        await settle()
        pending += [asyncio.create_task(keys.lookup(f"more-{i}", "RS256")) for i in range(10)]
        clock.advance(0.25)
    await settle()
    clock.advance(2)
    results = await asyncio.wait_for(asyncio.gather(*pending), 5)
    assert all(found == [] for found in results)  # unknown after a fresh read: refused
    assert 2 <= source.calls <= 1 + 6, source.calls  # the first load, then <= one a second
    assert keys.unknown("forged-0") and not keys.unknown("k0")
    await keys.aclose()


async def test_a_read_that_started_before_the_token_came_is_not_enough() -> None:
    clock = SteppedClock()
    source = KeySource(new_key("RS256"))
    keys = IssuerKeys(source, clock)  # type: ignore[arg-type]
    await keys.lookup("k0", "RS256")
    clock.advance(1.0)
    source.hold = asyncio.Event()
    earlier = asyncio.create_task(keys.lookup("other", "RS256"))  # starts read 2, held
    await settle()
    assert source.calls == 2
    source.publish(new_key("RS256"), "k1")  # published while read 2 is in flight
    lookup = asyncio.create_task(keys.lookup("k1", "RS256"))
    await settle()
    source.hold.set()
    assert await asyncio.wait_for(earlier, 5) == []
    await settle()
    assert not lookup.done()  # read 2 predates its token: it waits for read 3
    clock.advance(1.0)
    assert len(await asyncio.wait_for(lookup, 5)) == 1 and source.calls == 3
    await keys.aclose()


async def test_while_reads_fail_a_caller_gets_the_failure_at_once_then_reads_back_off() -> None:
    clock = SteppedClock()
    source = KeySource(new_key("RS256"))
    keys = IssuerKeys(source, clock, rand=lambda: 0.99)  # type: ignore[arg-type]
    await keys.lookup("k0", "RS256")
    clock.advance(1.0)
    source.failing = KubeUnavailable("jwks: Kubernetes API answered 503")
    with pytest.raises(KubeUnavailable, match="503"):
        await keys.lookup("k1", "RS256")  # the read it waited for failed
    with pytest.raises(KubeUnavailable, match="503"):
        await asyncio.wait_for(keys.lookup("k1", "RS256"), 0.5)  # held back: at once
    assert source.calls == 2
    assert keys.known("k0", "RS256")  # known kids are still answered from the held set
    source.failing = None
    clock.advance(1.0)  # the backoff after one failure: at most 1 s here
    assert await keys.lookup("k2", "RS256") == [] and source.calls == 3
    await keys.aclose()


async def test_a_down_api_server_is_raised_again_as_itself_while_reads_are_held_back() -> None:
    """The held-back path re-raises the last failure as a fresh error of its kind: for an API
    server taken for down (KubeDown, which carries its Retry-After) that was a TypeError, and
    every such /token an 'internal' 503 (found by the cluster tier under a 429 storm)."""
    clock = SteppedClock()
    source = KeySource(new_key("RS256"))
    keys = IssuerKeys(source, clock, rand=lambda: 0.99)  # type: ignore[arg-type]
    await keys.lookup("k0", "RS256")
    clock.advance(1.0)
    source.failing = KubeDown("jwks: the Kubernetes API is down; calls resume in 2 s", 2.0)
    with pytest.raises(KubeDown):
        await keys.lookup("k1", "RS256")
    with pytest.raises(KubeDown) as held:
        await asyncio.wait_for(keys.lookup("k1", "RS256"), 0.5)  # held back: raised again
    assert held.value.retry_after == 2.0 and "down" in held.value.reason
    assert keys.failure is not None and "down" in keys.failure
    await keys.aclose()


def _jwk_and_token(alg: str, claims: dict[str, Any]) -> tuple[dict[str, Any], str, Any]:
    from joserfc import jws
    from joserfc.jwk import ECKey, RSAKey

    key: Any = RSAKey.generate_key(2048) if alg == "RS256" else ECKey.generate_key("P-256")
    jwk = dict(key.as_dict(private=False), kid="k1")
    token = jws.serialize_compact({"alg": alg, "kid": "k1"}, json.dumps(claims), key)
    return jwk, token, key


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_issuer_key_signatures_verify_and_tampering_does_not(alg: str) -> None:
    from cp_token.authn.issuer_keys import parse_key_set, verifies

    jwk, token, _ = _jwk_and_token(alg, {"sub": "a"})
    keys = parse_key_set({"keys": [jwk]}).candidates("k1", alg)
    assert len(keys) == 1 and verifies(token, keys, alg)
    head, payload, signature = token.split(".")
    forged_payload = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB")
    assert not verifies(f"{head}.{forged_payload}.{signature}", keys, alg)
    assert not verifies(f"{head}.{payload}.{signature[:-4]}", keys, alg)  # wrong length
    assert not verifies(f"{head}.{payload}.***", keys, alg)  # not base64url
    other = "ES256" if alg == "RS256" else "RS256"
    assert not verifies(token, keys, other)  # a key of one type never checks the other alg


def test_malformed_issuer_keys_are_skipped() -> None:
    from cp_token.authn.issuer_keys import parse_key_set

    jwk, _, _ = _jwk_and_token("ES256", {})
    bad_point = dict(jwk, kid="bad", x=jwk["y"])  # not on the curve
    key_set = parse_key_set(
        {"keys": [jwk, bad_point, {"kty": "RSA", "kid": "r", "n": "!!", "e": "AQAB"}, "x"]}
    )
    assert set(key_set.by_kid) == {"k1"} and key_set.unusable_kids == {"bad", "r"}
