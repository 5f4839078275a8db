"""The oidc minter while the IdP misbehaves: one backoff paces every call (requests and the
refresher alike), short-lived upstream tokens cause no hot loop, a mid-run invalid_client
leaves readiness alone, a slow IdP gives a prompt 503, a garbage 200 counts as a failure."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable

import httpx
import pytest

from cp_token.errors import Unavailable
from cp_token.identity import Identity
from cp_token.minters.oidc import IDP_DARK_BACKOFF, OidcMinter, UpstreamToken
from cp_token.runtime.backoff import Backoff
from cp_token.runtime.clock import FakeClock
from cp_token.runtime.refresh import RefreshPolicy
from tests.fakes.clock import SteppedClock
from tests.fakes.idp import MALFORMED_MODES, FakeIdP
from tests.fakes.loop import run_until

WHO = Identity("system:serviceaccount:ns:session-1-sa")
SEED = 4


class RecordingMetrics:
    """The minter's metrics, kept in lists."""

    def __init__(self) -> None:
        self.results: list[str] = []
        self.up: list[bool] = []

    def idp_call(self, result: str, seconds: float) -> None:
        self.results.append(result)

    def dependency(self, name: str, up: bool) -> None:
        assert name == "idp"
        self.up.append(up)


def minter(
    clock: FakeClock, idp: FakeIdP | None = None, min_ttl: float = 300, **kw: object
) -> OidcMinter:
    if idp is not None:  # the fake IdP in process, on this test's event loop
        kw.setdefault("transport", idp.transport())
    return OidcMinter(
        token_url=idp.token_url if idp else "https://idp.example/oauth/token",
        client_id=idp.client_id if idp else "cp-token",
        client_secret=lambda: idp.client_secret if idp else "s3cret",
        min_ttl=min_ttl,
        clock=clock,
        rng=random.Random(SEED),
        **kw,  # type: ignore[arg-type]
    )


def calls_allowed_within(seconds: float, policy: Backoff = IDP_DARK_BACKOFF) -> int:
    """How many calls the shared backoff (same seed) allows in ``seconds`` of failures
    (by default while no usable token is held: the short one)."""
    rand = random.Random(SEED).random
    elapsed = 0.0
    for n in itertools.count(1):
        elapsed += policy.delay(n, rand)
        if elapsed > seconds:
            return n  # the first call, then one after each delay that fits
    raise AssertionError("unreachable")


async def until(predicate: Callable[[], bool], what: str, deadline: float = 10.0) -> None:
    """Let the loop run until ``predicate()``, bounded in event-loop rounds (the fake IdP
    answers in process, on this loop: nothing waits for time to pass)."""
    await run_until(predicate, what, rounds=int(deadline * 5000))


async def test_idp_down_calls_are_paced_by_one_backoff_whatever_the_load(idp: FakeIdP) -> None:
    clock = SteppedClock()
    m = minter(clock, idp)
    idp.fail("500")
    refresher = asyncio.create_task(m.run())
    outcomes: list[object] = []
    try:
        for _ in range(280):  # 28 s, 20 requests every 100 ms, the refresher running too
            clock.advance(0.1)
            batch = await asyncio.gather(*(m.mint(WHO) for _ in range(20)), return_exceptions=True)
            outcomes.extend(batch)
    finally:
        refresher.cancel()
        await m.aclose()
    assert len(outcomes) == 5600
    assert all(isinstance(r, Unavailable) and r.reason == "idp_unavailable" for r in outcomes)
    allowed = calls_allowed_within(28)
    # before the shared backoff: every request that found no usable token started a call
    # (143-166 in 28 s); with no usable token the pace stays within 2 s (at least 0.5 s)
    assert allowed - 1 <= idp.calls() <= allowed
    assert 14 <= allowed <= 57
    waits = {r.headers()["Retry-After"] for r in outcomes if isinstance(r, Unavailable)}
    assert all(1 <= int(w) <= 2 for w in waits)


async def test_during_the_backoff_a_request_gets_503_at_once_from_the_state(
    idp: FakeIdP,
) -> None:
    clock = FakeClock()
    m = minter(clock, idp)
    idp.fail("500")
    try:
        with pytest.raises(Unavailable):
            await m.mint(WHO)
        assert idp.calls() == 1
        wait = m.next_refresh_in()
        assert 0.5 <= wait <= 1.0
        for _ in range(100):
            with pytest.raises(Unavailable) as info:
                await m.mint(WHO)
            assert info.value.headers() == {"Retry-After": "1"}
        assert idp.calls() == 1  # no IdP call for any of them
        clock.advance(wait)
        idp.fail(None)
        assert idp.is_issued((await m.mint(WHO)).token)
        assert idp.calls() == 2
    finally:
        await m.aclose()


async def test_short_lived_idp_tokens_cause_no_hot_loop_and_one_log_line(
    idp: FakeIdP, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cp_token.minters.oidc")
    idp.set_expires_in(200)  # shorter than CP_TOKEN_MIN_TTL
    clock = FakeClock()  # the refresher's sleeps move this clock: it runs as fast as it can
    m = minter(clock, idp, min_ttl=300)
    start = clock.monotonic()
    refresher = asyncio.create_task(m.run())
    try:
        await until(lambda: clock.monotonic() >= start + 60, "a fake minute")
        refresher.cancel()
        elapsed = clock.monotonic() - start  # the refresher may have run a little past 60 s
        await until(lambda: not m.calling, "the last call to end")
        calls = idp.calls()
        # before: the refresher looped with no wait (about 23 calls per real second)
        assert calls <= calls_allowed_within(elapsed + 1e-6)
        assert calls >= 3  # it does keep trying
        for _ in range(50):
            with pytest.raises(Unavailable) as info:
                await m.mint(WHO)
            assert info.value.reason == "idp_short_lived"
        assert idp.calls() <= calls + 1  # not one call per request
    finally:
        refresher.cancel()
        await m.aclose()
    lines = [r for r in caplog.records if "CP_TOKEN_MIN_TTL" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR
    assert not any(tok in caplog.text for tok in idp.issued_tokens)


async def test_invalid_client_mid_run_keeps_readiness_and_the_cached_token(
    idp: FakeIdP, caplog: pytest.LogCaptureFixture
) -> None:
    clock = SteppedClock()
    metrics = RecordingMetrics()
    m = minter(clock, idp, metrics=metrics)
    refresher = asyncio.create_task(m.run())
    try:
        await until(lambda: metrics.results == ["200"], "the first token")
        first = await m.mint(WHO)
        idp.fail("invalid_client")
        await until(lambda: clock.sleepers > 0, "the refresher asleep until the refresh")
        clock.advance(1650)  # the background refresh is due
        await until(lambda: len(metrics.results) == 2, "the refresh")
        assert metrics.results == ["200", "401"] and metrics.up == [True, False]
        assert m.problem is None  # readiness unchanged: not a misconfiguration at start
        assert (await m.mint(WHO)).token == first.token  # still qualifies: served
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "invalid_client" in errors[0].getMessage()
        clock.advance(3600 - 1650 - 299)  # 299 s left: no longer qualifies
        with pytest.raises(Unavailable) as info:
            await m.mint(WHO)
        assert info.value.reason == "idp_rejected"
        assert m.problem is None
    finally:
        refresher.cancel()
        await m.aclose()


async def test_a_new_secret_is_tried_at_once_whatever_the_backoff(idp: FakeIdP) -> None:
    clock = FakeClock()
    secret = ["wrong"]
    m = OidcMinter(
        token_url=idp.token_url,
        client_id=idp.client_id,
        client_secret=lambda: secret[0],
        min_ttl=300,
        clock=clock,
        rng=random.Random(SEED),
    )
    try:
        for _ in range(5):
            clock.advance(m.next_refresh_in())
            with pytest.raises(Unavailable):
                await m.mint(WHO)
        assert m.problem is not None and "invalid_client" in m.problem
        assert m.next_refresh_in() > 0
        secret[0] = idp.client_secret
        m.credentials_changed()
        assert m.next_refresh_in() == 0
        assert idp.is_issued((await m.mint(WHO)).token)
        assert m.problem is None
    finally:
        await m.aclose()


async def test_a_slow_idp_gives_a_503_promptly_and_the_call_goes_on(idp: FakeIdP) -> None:
    idp.fail("hang")
    m = minter(FakeClock(), idp, request_wait=0.3)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises(Unavailable) as info:
            await m.mint(WHO)
        assert 0.3 <= loop.time() - started < 3
        assert info.value.reason == "idp_timeout"
        assert info.value.headers() == {"Retry-After": "1"}
        idp.fail(None)  # the held call is answered now, for whoever waits next
        token = None
        while token is None:
            assert loop.time() - started < 10
            try:
                token = (await m.mint(WHO)).token
            except Unavailable as exc:
                assert exc.reason == "idp_timeout"
        assert idp.is_issued(token)
        assert idp.calls() == 1  # the slow call served everyone: no second one
    finally:
        await m.aclose()


@pytest.mark.parametrize(
    "body",
    [
        b"<html>maintenance</html>",
        b'{"token_type": "Bearer"}',
        b'{"access_token": 5, "expires_in": 3600}',
        b'{"access_token": "", "expires_in": 3600}',
        b'{"access_token": "x", "expires_in": "soon"}',
        b'{"access_token": "x", "expires_in": 1e999}',
        b'{"access_token": "x", "expires_in": NaN}',
    ],
    ids=["html", "no-token", "number", "empty", "words", "infinite", "nan"],
)
async def test_a_garbage_200_is_a_failed_call_in_the_metric(body: bytes) -> None:
    metrics = RecordingMetrics()
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    m = minter(FakeClock(), transport=transport, metrics=metrics)
    try:
        with pytest.raises(Unavailable) as info:
            await m.mint(WHO)
        assert info.value.reason == "idp_unavailable"
        assert metrics.results == ["bad_answer"] and metrics.up == [False]
    finally:
        await m.aclose()


async def test_the_idps_retry_after_is_a_minimum_of_the_backoff_within_its_cap() -> None:
    """While a usable token is held, a refresh that fails with ``Retry-After: 20`` waits
    20 s; with none held, the wait stays within 2 s whatever the IdP says (the pod is dark:
    SPEC's recovery bound), and an absurd value never stalls the minter."""
    answers: list[str] = []
    busy_after = ["20"]

    def idp(request: httpx.Request) -> httpx.Response:
        answers.append("call")
        if len(answers) == 1:
            return httpx.Response(200, json={"access_token": "tok-1", "expires_in": 3600})
        return httpx.Response(
            503, json={"error": "temporarily_unavailable"}, headers={"Retry-After": busy_after[0]}
        )

    clock = FakeClock()
    start = clock.monotonic()
    m = minter(clock, transport=httpx.MockTransport(idp))
    try:
        assert (await m.mint(WHO)).token == "tok-1"
        clock.advance(m.next_refresh_in())  # the background refresh is due
        await m.refresh_once()
        assert len(answers) == 2 and 20 <= m.next_refresh_in() <= 30
        clock.advance(start + 3600 - 299 - clock.monotonic())  # no longer usable: dark
        clock.advance(m.next_refresh_in())
        busy_after[0] = "86400"
        with pytest.raises(Unavailable) as info:
            await m.mint(WHO)
        assert len(answers) == 3
        assert m.next_refresh_in() <= 2.0
        assert info.value.headers()["Retry-After"] in {"1", "2"}
    finally:
        await m.aclose()


# --- malformed answers and the recovery bound ----------------------------------------------


async def next_call(clock: SteppedClock, m: OidcMinter, metrics: RecordingMetrics) -> float:
    """Wait for the refresher to be asleep, move the clock to its next call, and wait for
    that call to end; returns the wait it had scheduled."""
    await until(lambda: clock.sleepers > 0 and not m.calling, "the refresher asleep")
    wait = m.next_refresh_in()
    n = len(metrics.results)
    clock.advance(wait)
    await until(lambda: len(metrics.results) > n, "the next call")
    return wait


@pytest.mark.parametrize("mode", sorted(MALFORMED_MODES))
async def test_a_malformed_idp_answer_is_a_failed_call_and_the_refresher_lives_on(
    idp: FakeIdP, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: ``Retry-After: ¹``, 400 digits or ``expires_in: "²"`` killed the refresher
    (the CP exited 1); a token with a newline would have been handed to every session."""
    caplog.set_level(logging.INFO, logger="cp_token.minters.oidc")
    clock = SteppedClock()
    metrics = RecordingMetrics()
    m = minter(clock, idp, metrics=metrics)
    idp.fail(mode)
    refresher = asyncio.create_task(m.run())
    try:
        await until(lambda: len(metrics.results) == 1, "the first call")
        for _ in range(3):  # more calls on the shared backoff: the loop lives on
            assert await next_call(clock, m, metrics) <= 2.0
        assert not refresher.done()
        assert metrics.up == [False] * 4
        with pytest.raises(Unavailable):
            await m.mint(WHO)
        idp.fail(None)
        await next_call(clock, m, metrics)
        assert metrics.results[-1] == "200"
        assert idp.is_issued((await m.mint(WHO)).token)
        assert not refresher.done()
    finally:
        refresher.cancel()
        await m.aclose()
    assert "SECRET" not in caplog.text
    assert all(len(r.getMessage()) < 400 for r in caplog.records)


async def test_without_a_usable_token_the_idp_is_retried_within_2_s(idp: FakeIdP) -> None:
    """SPEC "Riding out faults": while no upstream token with CP_TOKEN_MIN_TTL left is held,
    the retry interval stays within 2 s, so /token is back within 2.5 s of the IdP healing
    (before: the backoff grew to 30 s; 19.8 s measured from heal to token)."""
    clock = SteppedClock()
    metrics = RecordingMetrics()
    m = minter(clock, idp, metrics=metrics)
    idp.fail("500")
    refresher = asyncio.create_task(m.run())
    try:
        await until(lambda: len(metrics.results) == 1, "the first call")
        start = clock.monotonic()
        waits = []
        while clock.monotonic() - start < 120:  # two minutes of outage
            waits.append(await next_call(clock, m, metrics))
        assert max(waits) <= 2.0 and min(waits) >= 0.5
        idp.fail(None)  # healed: the next call, within 2 s, brings the token
        assert await next_call(clock, m, metrics) <= 2.0
        assert metrics.results[-1] == "200"
        assert idp.is_issued((await m.mint(WHO)).token)
        # with a usable token held, a failing refresh backs off on the long schedule again
        idp.fail("500")
        await next_call(clock, m, metrics)  # the refresh at half-life fails
        failures = [await next_call(clock, m, metrics) for _ in range(5)]
        assert max(failures) > 2.0
    finally:
        refresher.cancel()
        await m.aclose()


async def test_requests_keep_the_held_token_until_its_mandatory_window(idp: FakeIdP) -> None:
    """The advisory window (from halfway through the usable window) is the refresher's: a
    request keeps the held token without calling the IdP. In the last CP_TOKEN_MIN_TTL
    seconds (the mandatory window) the token is not handed out: a request waits for a
    fresh one."""
    clock = FakeClock()
    m = minter(clock, idp)  # CP_TOKEN_MIN_TTL 300, the IdP's tokens live 3600 s
    try:
        first = (await m.mint(WHO)).token
        assert m.next_refresh_in() == pytest.approx(1650)
        clock.advance(1650)  # the advisory window is open
        assert m.next_refresh_in() == 0
        assert (await m.mint(WHO)).token == first
        clock.advance(3300 - 1650)  # exactly CP_TOKEN_MIN_TTL left: still handed out
        minted = await m.mint(WHO)
        assert minted.token == first and idp.calls() == 1
        clock.advance(0.5)  # less than CP_TOKEN_MIN_TTL left: a request waits for a refresh
        fresh = (await m.mint(WHO)).token
        assert fresh != first and idp.is_issued(fresh)
        assert idp.calls() == 2
    finally:
        await m.aclose()


def test_the_upstream_token_is_never_in_its_repr() -> None:
    """A log line or a traceback that shows the held IdP token object never shows the token."""
    windows = RefreshPolicy(fraction=0.5).windows(0.0, 900.0)
    tok = UpstreamToken("idp-secret-token-value", 900.0, 1_800_000_900.0, 900.0, windows)
    assert "idp-secret-token-value" not in repr(tok) and "idp-secret" not in str(tok)


# --- folded from test_oidc_idp.py ----------------------------------------

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
