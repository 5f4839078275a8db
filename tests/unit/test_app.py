"""The /token route in-process: every status of docs/reference.md, headers, bodies, audit."""

from __future__ import annotations

import asyncio
import json
import logging
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import KeySet

from cp_token.app import create_app, create_metrics_app, token_body
from cp_token.authn.cache import CachedAuthenticator
from cp_token.errors import Unavailable
from cp_token.identity import Identity, token_hash
from cp_token.metrics import Metrics
from cp_token.minters import IssuedToken
from cp_token.minters.jwt import JwtMinter
from cp_token.policy import RunnerPolicy
from cp_token.ratelimit import RateLimiter
from cp_token.runtime.clock import FakeClock
from tests.fakes import looptime
from tests.fakes.cp_app import BOUND, RUNNER, TABLE, DictReviewer, build, call, clock, reviewer
from tests.fakes.loop import run_until, spin

__all__ = ["clock", "reviewer"]  # fixtures, from tests/fakes/cp_app.py


async def test_issued_token_is_a_verifiable_jwt(clock: FakeClock, reviewer: DictReviewer) -> None:
    app, minter = build(clock, reviewer)
    resp = await call(app, headers={"Authorization": "Bearer good"})
    assert resp.status_code == 200
    assert resp.headers["cache-control"] == "no-store"
    body = resp.json()
    assert set(body) == {"token", "token_type", "expires_at", "expires_in"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    assert body["expires_at"].endswith("Z")
    keys = KeySet.import_key_set(minter.jwks())
    tok = jwt.decode(body["token"], keys, algorithms=["ES256"])
    assert tok.header["kid"] == minter.jwks()["keys"][0]["kid"]
    c = tok.claims
    assert c["iss"] == "https://cp.test" and c["aud"] == "ambient-api-server"
    assert c["sub"] == RUNNER and c["namespace"] == "session-a"
    assert c["service_account"] == "session-abc-sa" and c["session_id"] == "abc"
    assert c["pod"] == "runner-abc"
    assert c["exp"] - c["iat"] == 900 and c["nbf"] == c["iat"] and c["jti"]


@pytest.mark.parametrize(
    ("headers", "status", "error", "www"),
    [
        ({}, 401, "invalid_token", "Bearer"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, 401, "invalid_token", "Bearer"),
        ({"Authorization": "Bearer "}, 401, "invalid_token", 'Bearer error="invalid_token"'),
        ({"Authorization": "Bearer nope"}, 401, "invalid_token", 'Bearer error="invalid_token"'),
        ({"Authorization": "Bearer unbound"}, 403, "access_denied", None),
        ({"Authorization": "Bearer other-sa"}, 403, "access_denied", None),
    ],
)
async def test_refusals(
    clock: FakeClock,
    reviewer: DictReviewer,
    headers: dict[str, str],
    status: int,
    error: str,
    www: str | None,
) -> None:
    app, _ = build(clock, reviewer)
    resp = await call(app, headers=headers)
    assert resp.status_code == status
    assert resp.json()["error"] == error
    assert resp.json()["error_description"]
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers.get("www-authenticate") == www


async def test_scheme_is_case_insensitive(clock: FakeClock, reviewer: DictReviewer) -> None:
    app, _ = build(clock, reviewer)
    assert (await call(app, headers={"Authorization": "bearer good"})).status_code == 200


@pytest.mark.parametrize("method", ["HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_are_405_and_never_mint(
    clock: FakeClock, reviewer: DictReviewer, method: str
) -> None:
    app, _ = build(clock, reviewer)
    resp = await call(app, method, headers={"Authorization": "Bearer good"})
    assert resp.status_code == 405
    assert resp.headers["allow"] == "GET"
    assert reviewer.calls == 0


@pytest.mark.parametrize("path", ["/token/", "/oauth2/token/"])
async def test_a_trailing_slash_is_not_redirected_to_a_token_route(
    clock: FakeClock, reviewer: DictReviewer, path: str
) -> None:
    app, _ = build(clock, reviewer)
    resp = await call(app, headers={"Authorization": "Bearer good"}, path=path)
    assert resp.status_code == 404  # not a 307 that a client would follow with its token
    assert reviewer.calls == 0


async def test_rate_limit(clock: FakeClock, reviewer: DictReviewer) -> None:
    app, _ = build(clock, reviewer, rate=1.0, burst=2)
    h = {"Authorization": "Bearer good"}
    assert [(await call(app, headers=h)).status_code for _ in range(2)] == [200, 200]
    resp = await call(app, headers=h)
    assert resp.status_code == 429
    assert resp.json()["error"] == "rate_limited"
    assert int(resp.headers["retry-after"]) >= 1
    clock.advance(1.0)
    assert (await call(app, headers=h)).status_code == 200


async def test_dependency_failure_is_503_not_401(clock: FakeClock, reviewer: DictReviewer) -> None:
    app, _ = build(clock, reviewer)
    reviewer.fail = Unavailable("the Kubernetes API is unavailable", retry_after=5)
    resp = await call(app, headers={"Authorization": "Bearer good"})
    assert resp.status_code == 503
    assert resp.json()["error"] == "temporarily_unavailable"
    assert 5 <= int(resp.headers["retry-after"]) <= 10  # 5 s, spread over 5 to 10
    assert resp.headers["cache-control"] == "no-store"


async def test_review_cache_and_negative_cache(clock: FakeClock, reviewer: DictReviewer) -> None:
    app, _ = build(clock, reviewer)
    for _ in range(5):
        assert (await call(app, headers={"Authorization": "Bearer good"})).status_code == 200
    assert reviewer.calls == 1
    clock.advance(31)
    await call(app, headers={"Authorization": "Bearer good"})
    assert reviewer.calls == 2
    for _ in range(3):
        await call(app, headers={"Authorization": "Bearer nope"})
    assert reviewer.calls == 3  # failed reviews remembered by hash
    clock.advance(6)
    await call(app, headers={"Authorization": "Bearer nope"})
    assert reviewer.calls == 4


async def test_cache_never_outlives_token_exp(clock: FakeClock) -> None:
    short = Identity(RUNNER, extra=BOUND, expires_at=clock.time() + 10)
    reviewer = DictReviewer({"short": short})
    app, _ = build(clock, reviewer)
    await call(app, headers={"Authorization": "Bearer short"})
    clock.advance(11)
    await call(app, headers={"Authorization": "Bearer short"})
    assert reviewer.calls == 2


async def test_singleflight_and_cap(clock: FakeClock, reviewer: DictReviewer) -> None:
    app, _ = build(clock, reviewer)
    reviewer.gate = asyncio.Event()
    h = {"Authorization": "Bearer good"}
    tasks = [asyncio.create_task(call(app, headers=h)) for _ in range(20)]
    await run_until(lambda: reviewer.calls == 1, "the first review under way")
    await spin(200)  # every other request reaches the cache and joins it
    reviewer.gate.set()
    results = await asyncio.gather(*tasks)
    assert {r.status_code for r in results} == {200}
    assert reviewer.calls == 1


def test_reviews_in_flight_are_capped(clock: FakeClock) -> None:
    """Four reviews in flight (max_in_flight=4); the other two wait 50 ms of loop time for a
    slot and are answered 503 (on virtual loop time: tests/fakes/looptime.py)."""
    table = {f"t{i}": Identity(RUNNER.replace("abc", str(i)), extra=BOUND) for i in range(6)}
    reviewer = DictReviewer(table)

    async def main() -> list[int]:
        reviewer.gate = asyncio.Event()
        app, _ = build(clock, reviewer, queue_wait=0.05)
        tasks = [
            asyncio.create_task(call(app, headers={"Authorization": f"Bearer t{i}"}))
            for i in range(6)
        ]
        await looptime.advance(0.2)
        reviewer.gate.set()
        return sorted(r.status_code for r in await asyncio.gather(*tasks))

    assert looptime.run(main()) == [200, 200, 200, 200, 503, 503]
    assert reviewer.calls == 4


async def test_audit_line_schema_and_no_token(
    clock: FakeClock, reviewer: DictReviewer, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = build(clock, reviewer)
    with caplog.at_level(logging.INFO, logger="cp_token.audit"):
        resp = await call(app, headers={"Authorization": "Bearer good"})
        await call(app, headers={"Authorization": "Bearer nope"})
    records = [r for r in caplog.records if r.name == "cp_token.audit"]
    assert len(records) == 2
    first = records[0].audit  # type: ignore[attr-defined]
    assert set(first) == {
        "event",
        "outcome",
        "reason",
        "username",
        "namespace",
        "pod",
        "jti",
        "latency_ms",
    }
    assert first["outcome"] == "issued" and first["username"] == RUNNER
    assert first["pod"] == "runner-abc" and first["namespace"] == "session-a"
    issued = resp.json()["token"]
    everything = caplog.text + json.dumps([r.audit for r in records])  # type: ignore[attr-defined]
    assert issued not in everything and issued[:20] not in everything
    assert "Bearer nope" not in everything


async def test_jwks_and_discovery(clock: FakeClock, reviewer: DictReviewer) -> None:
    app, _ = build(clock, reviewer)
    jwks = await call(app, path="/.well-known/jwks.json")
    assert jwks.status_code == 200
    assert "max-age=" in jwks.headers["cache-control"]
    key = jwks.json()["keys"][0]
    assert key["alg"] == "ES256" and key["use"] == "sig" and "d" not in key
    disc = (await call(app, path="/.well-known/openid-configuration")).json()
    assert disc["issuer"] == "https://cp.test"
    assert disc["jwks_uri"] == "https://cp.test/.well-known/jwks.json"


async def test_health_routes(clock: FakeClock, reviewer: DictReviewer) -> None:
    app, _ = build(clock, reviewer)
    assert (await call(app, path="/healthz")).text == "ok"
    assert (await call(app, path="/readyz")).status_code == 200


HEADER_VALUES = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.builds(
        lambda s, t: f"{s} {t}",
        st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", ""]),
        st.text(max_size=300),
    ),
    st.builds(
        lambda parts: "Bearer " + ".".join(parts),
        st.lists(st.text(alphabet="abcXYZ019-_=+/", max_size=40), max_size=5),
    ),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=HEADER_VALUES)
def test_malformed_authorization_never_5xx(value: str) -> None:
    clock = FakeClock()
    app, _ = build(clock, DictReviewer(dict(TABLE)))
    # Header values that HTTP cannot carry are refused by the client before sending.
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        raw = value.encode("utf-8")
    if any(c in raw for c in b"\r\n\x00"):
        return

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
            return await client.get("/token", headers=[(b"Authorization", raw)])

    resp = asyncio.run(go())
    assert resp.status_code in (200, 401, 403)
    assert resp.headers["cache-control"] == "no-store"
    if resp.status_code != 200:
        assert resp.json()["error"] in ("invalid_token", "access_denied")


def test_token_hash_is_not_the_token() -> None:
    assert token_hash("abc") != "abc" and len(token_hash("abc")) == 64


async def test_two_authorization_headers_are_refused(
    clock: FakeClock, reviewer: DictReviewer
) -> None:
    """Which of two credentials counts would be a guess: neither does (401, nothing minted)."""
    app, _ = build(clock, reviewer)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
        headers = [("Authorization", "Bearer good"), ("Authorization", "Bearer good")]
        resp = await client.get("/token", headers=headers)
    assert resp.status_code == 401
    assert resp.json()["error"] == "invalid_token"
    assert resp.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert reviewer.calls == 0


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
        minter=JwtMinter(issuer="https://cp", audience="api", ttl=900, clock=clock),
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


def test_the_routes_share_slots_by_client_address() -> None:
    """The app passes the client address: one remote address gets its share (here 1 of 4
    slots), another address is not held up by it; loopback (a local proxy) names no one.
    (On virtual loop time: the extra requests' 0.2 s queue wait passes at once.)"""
    table = {
        f"t{i}": Identity(f"system:serviceaccount:ns:session-{i}-sa", extra=BOUND) for i in range(8)
    }
    reviewer = DictReviewer(table)

    async def main() -> None:
        reviewer.gate = asyncio.Event()
        app, _ = build(FakeClock(), reviewer, queue_wait=0.2)  # max_in_flight=4: 1 per caller

        async def get(token: str, host: str) -> int:
            transport = httpx.ASGITransport(app=app, client=(host, 5000))
            async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
                resp = await client.get("/token", headers={"Authorization": f"Bearer {token}"})
                return resp.status_code

        noisy = [asyncio.create_task(get(f"t{i}", "10.0.0.9")) for i in range(3)]
        other = asyncio.create_task(get("t3", "10.0.0.10"))
        local = [asyncio.create_task(get(f"t{i}", "127.0.0.1")) for i in (4, 5)]
        await looptime.advance(0.4)
        assert reviewer.calls == 4  # 1 for 10.0.0.9, 1 for 10.0.0.10, 2 from loopback
        reviewer.gate.set()
        assert sorted(await asyncio.gather(*noisy)) == [200, 503, 503]
        assert await other == 200
        assert await asyncio.gather(*local) == [200, 200]

    looptime.run(main())
