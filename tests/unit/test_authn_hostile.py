"""Authentication under hostile input: the precheck, the caches, fair slots, the deadline.

Pure and in-process: a dict-backed reviewer, the fake clock, no network.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cp_token.authn.cache import CachedAuthenticator, Refusal
from cp_token.authn.fairness import FairSlots
from cp_token.authn.precheck import MAX_TOKEN_BYTES, decode_unverified, precheck
from cp_token.errors import Forbidden, Unauthenticated, Unavailable
from cp_token.identity import POD_NAME_KEY, POD_UID_KEY, Identity
from cp_token.policy import RunnerPolicy, glob_match
from cp_token.runtime.bounded import bounded_ttl
from cp_token.runtime.clock import FakeClock
from tests.fakes.cp_app import DictReviewer, build

NOW = 1_800_000_000.0
AUD = ("ambient-cp",)
BOUND = {POD_NAME_KEY: ("runner",), POD_UID_KEY: ("uid-1",)}


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt_of(header: Any, claims: Any, sig: str = "c2ln") -> str:
    def enc(v: Any) -> str:
        return b64(v if isinstance(v, bytes) else json.dumps(v).encode())

    return f"{enc(header)}.{enc(claims)}.{sig}"


GOOD_CLAIMS = {"aud": ["ambient-cp"], "exp": NOW + 600, "sub": "system:serviceaccount:a:b"}


def deep(n: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * n + close * n).encode()


# --- the precheck: nothing but Unauthenticated, whatever the input --------------------------

HOSTILE = [
    # nesting depth >= 1000 in header or payload (RecursionError before)
    b64(b'{"alg":"RS256","x":' + deep(1000) + b"}")
    + "."
    + b64(json.dumps(GOOD_CLAIMS).encode())
    + ".c2ln",
    b64(b'{"alg":"RS256"}') + "." + b64(b'{"a":' + deep(5000, '{"a":', "}") + b"}") + ".c2ln",
    # exp / nbf / iat of hundreds of digits (OverflowError in float() before)
    jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "exp": int("9" * 400)}),
    jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "nbf": -int("9" * 400)}),
    jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "iat": int("9" * 300)}),
    b64(b'{"alg":"RS256"}') + "." + b64(b'{"aud":"ambient-cp","exp":1e999}') + ".c2ln",
    b64(b'{"alg":"RS256"}') + "." + b64(b'{"aud":"ambient-cp","exp":NaN}') + ".c2ln",
    b64(b'{"alg":"RS256"}')
    + "."
    + b64(b'{"aud":"ambient-cp","exp":' + b"9" * 5000 + b"}")
    + ".c2ln",
    # wrong types
    jwt_of({"alg": ["RS256"]}, GOOD_CLAIMS),
    jwt_of({"alg": {"RS256": 1}}, GOOD_CLAIMS),
    jwt_of({"alg": "RS256", "kid": ["k"]}, GOOD_CLAIMS),
    jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "aud": {"ambient-cp": 1}}),
    jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "exp": "tomorrow"}),
    jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "exp": True}),
    jwt_of({}, GOOD_CLAIMS),
    jwt_of({"alg": "RS256"}, [GOOD_CLAIMS]),
    # encodings json.loads would sniff, and bytes that are no text at all
    jwt_of({"alg": "RS256"}, json.dumps(GOOD_CLAIMS).encode("utf-16")),
    jwt_of({"alg": "RS256"}, b"\xff\xfe\x00"),
    b64(b'{"alg":"RS256"}') + "." + b64(json.dumps(GOOD_CLAIMS).encode()) + ".c2ln\n",
    "a" * (MAX_TOKEN_BYTES + 1),
    "",
    "...",
    "a.b",
]


@pytest.mark.parametrize("token", HOSTILE, ids=range(len(HOSTILE)))
def test_precheck_refuses_hostile_tokens_as_401(token: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        precheck(token, AUD, NOW)
    if len(token.split(".")) == 3 and token.endswith(".c2ln") and len(token) < MAX_TOKEN_BYTES:
        assert info.value.description != "malformed token: not a JWT"  # refused for its content
    assert info.value.status == 401
    assert not token or token[:40] not in info.value.description


def test_precheck_is_cheap_on_deep_nesting() -> None:
    """The nesting bound is checked before json.loads recurses: far below the stack limit."""
    token = b64(b'{"alg":"RS256"}') + "." + b64(deep(6000)) + ".c2ln"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # json.loads of 6000 levels would fail loudly under this
    try:
        with pytest.raises(Unauthenticated) as info:
            precheck(token, AUD, NOW)
    finally:
        sys.setrecursionlimit(limit)
    assert "nests too many values" in info.value.description


def test_precheck_time_claims() -> None:
    ok = precheck(jwt_of({"alg": "ES256"}, GOOD_CLAIMS), AUD, NOW)
    assert ok.exp == NOW + 600 and ok.alg == "ES256" and ok.subject == "system:serviceaccount:a:b"
    for claims, reason in [
        ({**GOOD_CLAIMS, "exp": NOW - 100}, "expired"),
        ({**GOOD_CLAIMS, "nbf": NOW + 3600}, "not_yet_valid"),
        ({**GOOD_CLAIMS, "iat": NOW + 3600}, "not_yet_valid"),
        ({**GOOD_CLAIMS, "aud": "kube"}, "wrong_audience"),
    ]:
        with pytest.raises(Unauthenticated) as info:
            precheck(jwt_of({"alg": "RS256"}, claims), AUD, NOW)
        assert info.value.reason == reason


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
CLAIM_NAMES = st.sampled_from(["alg", "kid", "aud", "exp", "nbf", "iat", "sub", "iss", "typ"])
OBJECTS = st.dictionaries(CLAIM_NAMES | st.text(max_size=6), JSON, max_size=8)


@settings(max_examples=400, deadline=None)
@given(
    header=OBJECTS | JSON,
    claims=OBJECTS | JSON,
    sig=st.text(alphabet="abcXYZ019-_=+/.", max_size=30),
    depth=st.integers(min_value=0, max_value=3000),
)
def test_precheck_property_only_401(header: Any, claims: Any, sig: str, depth: int) -> None:
    if depth > 50:
        claims = {"aud": "ambient-cp", "x": json.loads("[" * 40 + "]" * 40), "d": depth}
    token = jwt_of(header, claims, sig or "s")
    try:
        jwt = precheck(token, AUD, NOW)
    except Unauthenticated as exc:
        assert exc.status == 401
        return
    assert isinstance(jwt.alg, str)
    assert jwt.exp is None or isinstance(jwt.exp, float)


# --- the caches hold values, bounded --------------------------------------------------------


class Reviewer:
    """Known tokens map to identities; `delay` makes every review take that long (real time)."""

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
            await asyncio.sleep(self.delay)
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
            await asyncio.sleep(0.01)
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


def test_bounded_cache_counts_entries_and_bytes() -> None:
    clock = FakeClock()
    cache: Any = bounded_ttl(
        max_entries=100, max_bytes=10_000, ttl=60, timer=clock.monotonic, estimate=len
    )
    for i in range(1000):
        cache[i] = "x"  # small: the entry bound holds
    assert len(cache) == 100
    for i in range(1000):
        cache[i] = "x" * 1000  # large: the byte bound holds
    assert len(cache) <= 10 and cache.currsize <= 10_000


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


# --- revocation: the review cache never outlives the reads it rests on ----------------------


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


# --- fair slots and the answer deadline ------------------------------------------------------


async def test_fair_slots_cap_each_caller() -> None:
    slots = FairSlots(total=8, per_caller=2)
    entered = asyncio.Event()
    release = asyncio.Event()
    holding = 0

    async def hold(keys: list[str], deadline: float) -> str:
        nonlocal holding
        try:
            async with slots.hold(keys, deadline):
                holding += 1
                entered.set()
                await release.wait()
                return "ok"
        except Unavailable as exc:
            return exc.reason

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 0.2
    noisy = [asyncio.create_task(hold(["peer:a"], deadline)) for _ in range(6)]
    await asyncio.sleep(0.05)
    assert slots.held_by("peer:a") == 2
    quiet = [asyncio.create_task(hold([f"peer:{i}"], deadline)) for i in range(5)]
    await asyncio.sleep(0.3)  # past the deadline: the noisy extras gave up
    release.set()
    noisy_results = await asyncio.gather(*noisy)
    assert sorted(noisy_results) == ["caller_saturated"] * 4 + ["ok"] * 2
    assert await asyncio.gather(*quiet) == ["ok"] * 5
    assert len(slots) == 0  # every caller forgotten once idle


async def test_a_flooding_caller_cannot_starve_others() -> None:
    clock = FakeClock(start=NOW)
    legit = {
        jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "sub": f"pod-{i}"}): Identity(
            f"system:serviceaccount:ns:session-{i}-sa", extra=BOUND
        )
        for i in range(10)
    }
    reviewer = Reviewer(legit, delay=0.3)
    auth = authenticator(reviewer, clock, max_in_flight=16, queue_wait=0.2)
    flood = [
        jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "sub": f"forged-{i}", "n": i}) for i in range(200)
    ]

    async def attempt(token: str, peer: str) -> str:
        try:
            await auth.authenticate(token, peer=peer)
        except (Unauthenticated, Unavailable) as exc:
            return exc.reason
        return "ok"

    attack = [asyncio.create_task(attempt(t, "10.0.0.66")) for t in flood]
    await asyncio.sleep(0.05)
    good = await asyncio.gather(*(attempt(t, f"10.0.1.{i}") for i, t in enumerate(legit)))
    results = await asyncio.gather(*attack)
    assert good == ["ok"] * 10
    assert results.count("not_authenticated") <= 2 * 2  # 2 slots (16 // 8), ~2 rounds
    assert set(results) <= {"not_authenticated", "caller_saturated"}


async def test_hung_reviewer_is_answered_503_within_the_bound() -> None:
    reviewer = Reviewer()
    reviewer.hang = True
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

    results = await asyncio.gather(*(timed(i) for i in range(6)))
    assert {r for r, _ in results} == {"kube_timeout", "reviews_saturated"}
    assert max(t for _, t in results) <= 0.2 + 0.4 + 0.05


def test_refusal_round_trip() -> None:
    r = Refusal.of(Unavailable("down", reason="kube_unavailable", retry_after=7))
    exc = r.error()
    assert (
        isinstance(exc, Unavailable) and exc.retry_after == 7 and exc.reason == "kube_unavailable"
    )
    assert isinstance(Refusal.of(Unauthenticated("no", reason="x")).error(), Unauthenticated)
    assert decode_unverified(jwt_of({"alg": "RS256", "kid": "k"}, {})).kid == "k"


# --- the ServiceAccount pattern never admits an empty session id -------------------------------


@pytest.mark.parametrize(
    ("name", "admitted"),
    [
        ("session-abc-sa", True),
        ("session---sa", True),  # the id is "-": not empty
        ("session--sa", False),
        ("session-sa", False),
    ],
)
def test_empty_session_id_is_never_admitted(name: str, admitted: bool) -> None:
    identity = Identity(f"system:serviceaccount:ns:{name}", extra=BOUND)
    for policy in (RunnerPolicy(), RunnerPolicy(allowed_sa="system:serviceaccount:*:*")):
        if admitted:
            policy.check_identity(identity)
            assert identity.session_id
        else:
            with pytest.raises(Forbidden) as info:
                policy.check_identity(identity)
            assert info.value.reason == "sa_not_allowed"
            if name == "session--sa":  # the reason, not a pattern it does match
                assert "empty session id" in info.value.description


def test_a_line_break_in_the_session_id_is_refused_for_what_it_is() -> None:
    identity = Identity("system:serviceaccount:ns:session-a\nb-sa", extra=BOUND)
    with pytest.raises(Forbidden) as info:
        RunnerPolicy().check_identity(identity)
    assert info.value.reason == "sa_not_allowed"
    assert "invalid session id" in info.value.description  # not "empty": it is not


def test_glob_is_fnmatch_with_a_non_empty_star() -> None:
    assert glob_match("team-a", "team-*") and not glob_match("team-", "team-*")
    assert glob_match("a]d", "a[]]d") and glob_match("axd", "a[!bc]d")
    assert not glob_match("abd", "a[!bc]d") and glob_match("a.c", "a?c")
    assert not glob_match("abc", "a.c")  # a dot is a dot, not a regex


async def test_the_routes_share_slots_by_client_address() -> None:
    """The app passes the client address: one remote address gets its share (here 1 of 4
    slots), another address is not held up by it; loopback (a local proxy) names no one."""
    table = {
        f"t{i}": Identity(f"system:serviceaccount:ns:session-{i}-sa", extra=BOUND) for i in range(8)
    }
    reviewer = DictReviewer(table)
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
    await asyncio.sleep(0.4)
    assert reviewer.calls == 4  # 1 for 10.0.0.9, 1 for 10.0.0.10, 2 from loopback
    reviewer.gate.set()
    assert sorted(await asyncio.gather(*noisy)) == [200, 503, 503]
    assert await other == 200
    assert await asyncio.gather(*local) == [200, 200]
