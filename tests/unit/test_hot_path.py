"""The pieces the CP's hot path was rebuilt from: the bounded cache, the rate limiter's
buckets, the audit line written directly, the jwt minter's reuse window, the metrics."""

from __future__ import annotations

import io
import json
import logging
import math
import uuid
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cp_token.app import create_app, create_metrics_app, token_body
from cp_token.authn.cache import CachedAuthenticator
from cp_token.authn.precheck import b64url_bytes
from cp_token.errors import RateLimited
from cp_token.identity import POD_NAME_KEY, POD_UID_KEY, Identity
from cp_token.metrics import NO_METRICS, Metrics
from cp_token.minters import IssuedToken, MintOptions
from cp_token.minters.jwt import JwtMinter, new_jti
from cp_token.policy import RunnerPolicy
from cp_token.ratelimit import RateLimiter
from cp_token.runtime.bounded import BoundedCache, bounded_ttl
from cp_token.runtime.clock import FakeClock
from cp_token.runtime.logs import AUDIT_FIELDS, JsonFormatter, audit, audit_json

RUNNER = "system:serviceaccount:session-a:session-abc-sa"
BOUND = {POD_NAME_KEY: ("runner-abc",), POD_UID_KEY: ("uid-1",)}


# --- BoundedCache ---------------------------------------------------------------------------


def cache(clock: FakeClock, entries: int = 100, size: int = 10_000) -> BoundedCache[str, Any]:
    return BoundedCache(
        max_entries=entries,
        max_bytes=size,
        expires=lambda _k, value, now: now + value[1],
        timer=clock.monotonic,
        estimate=lambda value: value[0],
    )


def test_each_entry_lives_until_its_own_expiry() -> None:
    clock = FakeClock()
    c = cache(clock)
    c["short"], c["long"] = (1, 5.0), (1, 50.0)
    clock.advance(4.9)
    assert c.get("short") == (1, 5.0)
    clock.advance(0.1)  # expiry is exclusive
    assert c.get("short") is None and c.get("long") == (1, 50.0)
    c["gone"] = (1, 0.0)  # already expired: not stored
    assert c.get("gone") is None and len(c) == 1


def test_the_least_recently_used_goes_first_when_full() -> None:
    clock = FakeClock()
    c = cache(clock, entries=3, size=3_000)
    c["a"], c["b"], c["c"] = (10, 60.0), (10, 60.0), (10, 60.0)
    assert c.get("a") is not None  # a is now the most recently used
    c["d"] = (10, 60.0)
    assert set(c) == {"a", "c", "d"}
    c["big"] = (2_000, 60.0)  # the byte bound: room is made from the least recently used
    assert set(c) == {"d", "big"} and c.currsize <= c.maxsize


def test_expired_entries_are_dropped_before_live_ones() -> None:
    clock = FakeClock()
    c = cache(clock, entries=2, size=2_000)
    c["old"], c["live"] = (10, 1.0), (10, 60.0)
    assert c.get("live") is not None
    clock.advance(2)
    c["new"] = (10, 60.0)
    assert set(c) == {"live", "new"}


def test_replacing_keeps_the_bounds_and_the_expiry_heap_stays_small() -> None:
    clock = FakeClock()
    c = cache(clock, entries=10, size=10_000)
    for i in range(10_000):
        c[f"k{i % 20}"] = (100, 3600.0)
    assert len(c) == 10 and c.currsize == 10 * 1000  # each counts at least max_bytes / 10
    assert len(c._heap) <= 2 * len(c) + 64


def test_a_value_over_the_whole_budget_is_refused() -> None:
    c = cache(FakeClock(), entries=10, size=100)
    with pytest.raises(ValueError, match="too large"):
        c["x"] = (101, 60.0)


def test_bounded_ttl_counts_entries_and_bytes() -> None:
    clock = FakeClock()
    c: Any = bounded_ttl(max_entries=5, max_bytes=500, ttl=10, timer=clock.monotonic, estimate=len)
    for i in range(50):
        c[i] = "x"
    assert len(c) == 5
    clock.advance(10)
    assert c.get(49) is None


# --- RateLimiter ----------------------------------------------------------------------------


def test_buckets_are_bounded_and_idle_ones_forgotten() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock, maxsize=3)
    for name in "abcd":
        limiter.check(name)
    assert len(limiter) == 3  # the least recently used went
    clock.advance(3.1)  # idle past burst/rate + 1: full again, forgotten at the next new key
    limiter.check("e")
    assert len(limiter) == 1


def test_an_active_bucket_keeps_its_state_and_long_keys_are_hashed() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=1, clock=clock, maxsize=10)
    long_name = "system:serviceaccount:" + "n" * 300
    limiter.check(long_name)
    with pytest.raises(RateLimited) as info:
        limiter.check(long_name)
    assert info.value.retry_after == pytest.approx(1.0)
    assert all(len(key) <= 64 for key in limiter._buckets)


# --- the audit line ---------------------------------------------------------------------------

TEXT = st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["\x7f", "é", "\u2028", '"\\']))


@given(
    event=st.sampled_from(["token_request", "token_exchange"]),
    outcome=TEXT,
    reason=TEXT,
    username=TEXT,
    namespace=TEXT,
    pod=TEXT,
    jti=TEXT,
    latency=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers()),
    created=st.floats(min_value=0, max_value=4e9),
)
def test_the_direct_audit_line_is_json_dumps_text(**values: Any) -> None:
    created = values.pop("created")
    fields = dict(zip(AUDIT_FIELDS[1:-1], list(values.values())[:-1], strict=True))
    fields["latency_ms"] = values["latency"]
    line = audit_json(created, fields)
    ts = json.loads(line)["ts"]
    expected = json.dumps({"ts": ts, **fields}, separators=(",", ":")).replace("\x7f", "\\u007f")
    assert line == expected
    assert all(0x20 <= ord(c) < 0x7F for c in line)


def test_the_audit_record_goes_through_the_logger_and_its_handlers() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("cp_token.audit")
    level = logger.level
    logger.addHandler(handler)
    try:
        logger.setLevel(logging.WARNING)  # below the logger's level: nothing written
        audit(
            outcome="issued",
            reason="ok",
            username="u",
            namespace=None,
            pod=None,
            jti=None,
            latency_ms=1.0,
        )
        assert out.getvalue() == ""
        logger.setLevel(logging.INFO)
        audit(
            outcome="issued",
            reason="ok",
            username="u",
            namespace="n",
            pod="p",
            jti="j",
            latency_ms=1.23456,
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    line = json.loads(out.getvalue())
    assert list(line) == list(AUDIT_FIELDS) and line["latency_ms"] == 1.235


# --- the jwt minter's reuse window ------------------------------------------------------------


def minter(clock: FakeClock, ttl: float = 900, **kw: Any) -> JwtMinter:
    return JwtMinter(issuer="https://cp", audience="api", ttl=ttl, clock=clock, **kw)


async def test_a_caller_asking_again_at_once_gets_the_same_token() -> None:
    clock = FakeClock()
    m = minter(clock)
    assert m.reuse_window == 9.0  # 1 % of 900 s
    who = Identity(RUNNER, extra=BOUND)
    first = await m.mint(who)
    clock.advance(9.0)
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


def test_token_body_is_json_dumps_text() -> None:
    issued = IssuedToken(token='a.b.c\x7fé"', expires_at=1_800_000_900.7, jti="j")
    body = token_body(issued, 1_800_000_000.2)
    assert json.loads(body) == {
        "token": 'a.b.c\x7fé"',
        "token_type": "Bearer",
        "expires_at": "2027-01-15T08:15:00Z",
        "expires_in": 900,
    }
    assert body == json.dumps(json.loads(body), separators=(",", ":")).encode()
    opaque = token_body(IssuedToken(token="t", expires_at=None), 0)
    assert json.loads(opaque) == {
        "token": "t",
        "token_type": "Bearer",
        "expires_at": None,
        "expires_in": None,
    }


# --- base64url ------------------------------------------------------------------------------


@given(st.text(alphabet="abcXYZ019-_+/=. \n\x00é", max_size=12))
def test_b64url_accepts_exactly_unpadded_base64url(text: str) -> None:
    import base64
    import binascii
    import re

    valid = bool(re.fullmatch(r"[A-Za-z0-9_-]+", text))
    try:
        expected: bytes | None = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        expected = None
    try:
        got: bytes | None = b64url_bytes(text)
    except ValueError:
        got = None
    assert got == (expected if valid else None)


# --- metrics --------------------------------------------------------------------------------


def test_loop_metrics_count() -> None:
    metrics = Metrics()
    metrics.request("issued", "ok", 0.001)
    metrics.request("issued", "ok", 0.002)
    metrics.cache("review", True)
    assert metrics.requests.value("issued", "ok") == 2
    assert metrics.minted.value() == 2
    assert metrics.cache_lookups.value("review", "hit") == 1
    NO_METRICS.request("issued", "ok", 0.1)  # records nothing, raises nothing
    NO_METRICS.cache("review", False)


async def test_the_metrics_port_serves_the_library_s_exposition() -> None:
    metrics = Metrics(authn="static", minter="jwt")
    metrics.request("issued", "ok", 0.01)
    app = create_metrics_app(metrics, lambda: None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
        text = await client.get("/metrics")
        openmetrics = await client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text"}
        )
        refused = await client.post("/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert 'cp_token_requests_total{outcome="issued",reason="ok"} 1.0' in text.text
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert refused.status_code == 405


# --- the raw token door and Starlette's route agree -------------------------------------------


class OneReviewer:
    async def review(self, token: str) -> Identity:
        return Identity(RUNNER, extra=BOUND)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("root_path", ["", "/cp"])
async def test_the_token_door_answers_alike_with_or_without_the_shortcut(root_path: str) -> None:
    clock = FakeClock()
    auth = CachedAuthenticator(
        OneReviewer(),
        clock=clock,
        audiences=("ambient-cp",),
        ttl=30,
        max_in_flight=4,
        jwt_precheck=False,
    )
    app = create_app(
        authenticator=auth,
        policy=RunnerPolicy(),
        minter=minter(clock),
        clock=clock,
        limiter=RateLimiter(5.0, 20, clock),
    )
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
        ok = await client.get(f"{root_path}/token", headers={"Authorization": "Bearer t"})
        head = await client.head(f"{root_path}/token", headers={"Authorization": "Bearer t"})
    assert ok.status_code == 200 and ok.headers["cache-control"] == "no-store"
    assert ok.headers["content-type"] == "application/json"
    assert math.isclose(ok.json()["expires_in"], 900)
    assert head.status_code == 405 and head.headers["allow"] == "GET"


# --- issuer-key signatures, verified with cryptography directly --------------------------------


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


async def test_the_reviewer_gets_the_precheck_s_decoding() -> None:
    from cp_token.authn.precheck import UnverifiedJWT

    seen: list[UnverifiedJWT] = []

    class Decoded:
        async def review(self, token: str) -> Identity:
            raise AssertionError("review_decoded is used when the token was prechecked")

        async def review_decoded(self, token: str, jwt: UnverifiedJWT) -> Identity:
            seen.append(jwt)
            return Identity(RUNNER, extra=BOUND)

        async def aclose(self) -> None:
            pass

    clock = FakeClock()
    claims = {"aud": ["ambient-cp"], "exp": clock.time() + 600, "sub": RUNNER}
    _, token, _ = _jwk_and_token("ES256", claims)
    auth = CachedAuthenticator(
        Decoded(), clock=clock, audiences=("ambient-cp",), ttl=30, max_in_flight=4
    )
    assert (await auth.authenticate(token)).username == RUNNER
    assert len(seen) == 1 and seen[0].claims["sub"] == RUNNER


def test_loop_metrics_expose_what_the_library_s_own_would() -> None:
    import re

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

    from cp_token.metrics import LATENCY_BUCKETS, SharedFamilies
    from cp_token.runtime import metrics as shared

    ours, theirs = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
    counter = Counter("c", "Counted", ["outcome", "reason"], registry=theirs)
    histogram = Histogram(
        "h_seconds", "Timed", ["outcome"], buckets=LATENCY_BUCKETS, registry=theirs
    )
    plain = Histogram("p_seconds", "Plain", buckets=LATENCY_BUCKETS, registry=theirs)
    gauge = Gauge("up", "Up", ["dependency"], registry=theirs)
    loop_counter = shared.Counter("c", "Counted", ("outcome", "reason"))
    loop_histogram = shared.Histogram("h_seconds", "Timed", LATENCY_BUCKETS, ("outcome",))
    loop_plain = shared.Histogram("p_seconds", "Plain", LATENCY_BUCKETS, series=[()])
    up = {"kubernetes": 0.0, "idp": 1.0}
    loop_gauge = shared.Gauge(
        "up", "Up", lambda: [((k,), v) for k, v in up.items()], ("dependency",)
    )
    SharedFamilies([loop_counter, loop_histogram, loop_plain, loop_gauge], ours)
    for name, value in up.items():
        gauge.labels(name).set(value)
    plain.observe(0.3)
    loop_plain.observe(0.3)
    for outcome, reason, seconds in [
        ("issued", "ok", 0.0004),
        ("issued", "ok", 0.001),  # on a bound: that bucket
        ("invalid_token", "expired", 3.0),
        ("issued", "ok", 11.0),  # beyond the last bound: +Inf
    ]:
        counter.labels(outcome, reason).inc()
        loop_counter.inc(outcome, reason)
        histogram.labels(outcome).observe(seconds)
        loop_histogram.observe(seconds, outcome)

    def text(render: Any, registry: Any) -> str:  # creation times differ: compare the rest
        return re.sub(r"(_created\{?[^ ]*\}? )[0-9.e+]+", r"\1T", render(registry).decode())

    assert text(generate_latest, ours) == text(generate_latest, theirs)
    assert text(openmetrics, ours) == text(openmetrics, theirs)
