"""The review cache in front of every authenticator: positive and negative caching bounded in
entries and bytes, coalesced reviews, fresh exceptions per waiter, the answer deadline, fair
slots per caller."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest

from cp_token.authn.cache import CachedAuthenticator, Refusal
from cp_token.authn.precheck import MAX_TOKEN_BYTES, decode_unverified
from cp_token.errors import Unauthenticated, Unavailable
from cp_token.identity import POD_NAME_KEY, POD_UID_KEY, Identity
from cp_token.runtime.clock import FakeClock
from tests.fakes import looptime
from tests.fakes.loop import spin

RUNNER = "system:serviceaccount:session-a:session-abc-sa"


BOUND = {POD_NAME_KEY: ("runner-abc",), POD_UID_KEY: ("uid-1",)}


def _jwk_and_token(alg: str, claims: dict[str, Any]) -> tuple[dict[str, Any], str, Any]:
    from joserfc import jws
    from joserfc.jwk import ECKey, RSAKey

    key: Any = RSAKey.generate_key(2048) if alg == "RS256" else ECKey.generate_key("P-256")
    jwk = dict(key.as_dict(private=False), kid="k1")
    token = jws.serialize_compact({"alg": alg, "kid": "k1"}, json.dumps(claims), key)
    return jwk, token, key


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


NOW = 1_800_000_000.0


AUD = ("ambient-cp",)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt_of(header: Any, claims: Any, sig: str = "c2ln") -> str:
    def enc(v: Any) -> str:
        return b64(v if isinstance(v, bytes) else json.dumps(v).encode())

    return f"{enc(header)}.{enc(claims)}.{sig}"


GOOD_CLAIMS = {"aud": ["ambient-cp"], "exp": NOW + 600, "sub": "system:serviceaccount:a:b"}


class Reviewer:
    """Known tokens map to identities; ``delay`` makes every review take that long (of loop
    time: a test using it runs on virtual time, tests/fakes/looptime.py)."""

    def __init__(self, table: dict[str, Identity] | None = None, delay: float = 0.0) -> None:
        self.table = table or {}
        self.delay = delay
        self.calls = 0
        self.hang = False

    async def review(self, token: str) -> Identity:
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()
        if self.delay:
            await looptime.advance(self.delay)
        if token in self.table:
            return self.table[token]
        raise Unauthenticated("unknown token", reason="not_authenticated")


def authenticator(reviewer: Reviewer, clock: FakeClock, **kw: Any) -> CachedAuthenticator:
    return CachedAuthenticator(
        reviewer,
        clock=clock,
        audiences=AUD,
        ttl=kw.pop("ttl", 30.0),
        max_in_flight=kw.pop("max_in_flight", 64),
        jwt_precheck=kw.pop("jwt_precheck", True),
        **kw,
    )


def unknown_token(n: int = 0, size: int = 16_000) -> str:
    claims = {**GOOD_CLAIMS, "sub": f"sub-{n}", "pad": "x" * (size * 3 // 4 - 200)}
    return jwt_of({"alg": "RS256", "kid": "k"}, claims)


async def test_negative_cache_holds_a_reason_and_raises_fresh_exceptions() -> None:
    clock = FakeClock(start=NOW)
    reviewer = Reviewer()
    auth = authenticator(reviewer, clock)
    token = unknown_token()
    raised: list[Unauthenticated] = []
    for _ in range(50):
        with pytest.raises(Unauthenticated) as info:
            await auth.authenticate(token)
        raised.append(info.value)
    assert reviewer.calls == 1  # remembered by hash
    assert len({id(e) for e in raised}) == 50  # a new exception every time
    depths = []
    for exc in raised[1:]:
        tb, n = exc.__traceback__, 0
        while tb is not None:
            tb, n = tb.tb_next, n + 1
        depths.append(n)
    assert max(depths) == min(depths)  # no traceback grows with replays
    stored = list(auth._bad.values())
    assert stored == [Refusal(False, "unknown token", "not_authenticated")]
    assert not any(isinstance(v, BaseException) for v in stored)
    clock.advance(6)
    with pytest.raises(Unauthenticated):
        await auth.authenticate(token)
    assert reviewer.calls == 2


async def test_unavailable_is_not_remembered_and_is_fresh_per_waiter() -> None:
    class Failing(Reviewer):
        async def review(self, token: str) -> Identity:
            self.calls += 1
            await spin(10)  # the other callers join this review meanwhile
            raise Unavailable("the Kubernetes API is unavailable", reason="kube_unavailable")

    reviewer = Failing()
    auth = authenticator(reviewer, FakeClock(start=NOW))
    token = unknown_token(size=500)
    results = await asyncio.gather(
        *(auth.authenticate(token) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, Unavailable) for r in results)
    assert len({id(r) for r in results}) == 5 and reviewer.calls == 1  # shared review
    with pytest.raises(Unavailable):
        await auth.authenticate(token)
    assert reviewer.calls == 2  # an outage is never remembered as a refusal


async def test_a_bug_in_a_reviewer_is_a_503_not_a_shared_traceback() -> None:
    class Broken(Reviewer):
        async def review(self, token: str) -> Identity:
            raise KeyError("boom")

    auth = authenticator(Broken(), FakeClock(start=NOW))
    with pytest.raises(Unavailable) as info:
        await auth.authenticate(unknown_token(size=500))
    assert info.value.reason == "internal"


async def test_distinct_garbage_is_bounded_in_entries_and_bytes() -> None:
    clock = FakeClock(start=NOW)
    auth = authenticator(Reviewer(), clock, max_entries=200, max_bytes=1_000_000)
    for i in range(1000):
        with pytest.raises(Unauthenticated):
            await auth.authenticate(unknown_token(i, size=2000))
    assert len(auth._bad) <= 200


async def test_over_16k_is_refused_unparsed_even_in_static_mode() -> None:
    reviewer = Reviewer()
    auth = authenticator(reviewer, FakeClock(start=NOW), jwt_precheck=False)
    with pytest.raises(Unauthenticated) as info:
        await auth.authenticate("a" * (MAX_TOKEN_BYTES + 1))
    assert info.value.reason == "malformed" and reviewer.calls == 0


async def test_review_cache_capped_at_the_liveness_proof() -> None:
    clock = FakeClock(start=NOW)
    proof_until = clock.monotonic() + 1.0  # e.g. a pod read 9 s ago, cached 10 s
    identity = Identity("system:serviceaccount:a:session-x-sa", cache_until=proof_until)
    reviewer = Reviewer({"t": identity})
    auth = authenticator(reviewer, clock, ttl=10, jwt_precheck=False)
    assert await auth.authenticate("t") == identity
    clock.advance(0.9)
    await auth.authenticate("t")
    assert reviewer.calls == 1
    clock.advance(0.2)  # past the proof, well inside the 10 s review TTL
    await auth.authenticate("t")
    assert reviewer.calls == 2


def test_a_flooding_caller_cannot_starve_others() -> None:
    """200 forged tokens from one address, reviews of 0.3 s, a queue wait of 0.2 s (loop time,
    virtual): the flood gets its 2 slots, ten other pods all get through."""
    clock = FakeClock(start=NOW)
    legit = {
        jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "sub": f"pod-{i}"}): Identity(
            f"system:serviceaccount:ns:session-{i}-sa", extra=BOUND
        )
        for i in range(10)
    }
    reviewer = Reviewer(legit, delay=0.3)
    flood = [
        jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "sub": f"forged-{i}", "n": i}) for i in range(200)
    ]

    async def main() -> tuple[list[str], list[str]]:
        auth = authenticator(reviewer, clock, max_in_flight=16, queue_wait=0.2)

        async def attempt(token: str, peer: str) -> str:
            try:
                await auth.authenticate(token, peer=peer)
            except (Unauthenticated, Unavailable) as exc:
                return exc.reason
            return "ok"

        attack = [asyncio.create_task(attempt(t, "10.0.0.66")) for t in flood]
        await looptime.advance(0.05)
        good = await asyncio.gather(*(attempt(t, f"10.0.1.{i}") for i, t in enumerate(legit)))
        return good, await asyncio.gather(*attack)

    good, results = looptime.run(main())
    assert good == ["ok"] * 10
    assert results.count("not_authenticated") <= 2 * 2  # 2 slots (16 // 8), ~2 rounds
    assert set(results) <= {"not_authenticated", "caller_saturated"}


def test_hung_reviewer_is_answered_503_within_the_bound() -> None:
    """Loop time is virtual: the bound is checked exactly, in no wall-clock time."""
    reviewer = Reviewer()
    reviewer.hang = True

    async def main() -> tuple[float, list[tuple[str, float]]]:
        auth = authenticator(
            reviewer, FakeClock(start=NOW), max_in_flight=2, queue_wait=0.2, call_timeout=0.4
        )
        loop = asyncio.get_running_loop()

        async def timed(i: int) -> tuple[str, float]:
            start = loop.time()
            try:
                await auth.authenticate(unknown_token(i, size=400))
            except Unavailable as exc:
                return exc.reason, loop.time() - start
            return "ok", loop.time() - start

        return auth.answer_within, await asyncio.gather(*(timed(i) for i in range(6)))

    answer_within, results = looptime.run(main())
    assert {r for r, _ in results} == {"kube_timeout", "reviews_saturated"}
    assert max(t for _, t in results) <= 0.2 + 0.4 + 0.05
    assert sorted(t for r, t in results if r == "kube_timeout") == [answer_within] * 2
    assert sorted(t for r, t in results if r == "reviews_saturated") == [pytest.approx(0.2)] * 4


def test_refusal_round_trip() -> None:
    r = Refusal.of(Unavailable("down", reason="kube_unavailable", retry_after=7))
    exc = r.error()
    assert (
        isinstance(exc, Unavailable) and exc.retry_after == 7 and exc.reason == "kube_unavailable"
    )
    assert isinstance(Refusal.of(Unauthenticated("no", reason="x")).error(), Unauthenticated)
    assert decode_unverified(jwt_of({"alg": "RS256", "kid": "k"}, {})).kid == "k"
