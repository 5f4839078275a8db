"""TokenSource: resolution order, caching, retries, refusals, URL and proxy rules."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import cp_token.client._source as source_module
from cp_token.client import TokenError, TokenRejected, TokenSource, TokenUnavailable
from cp_token.runtime.clock import FakeClock
from tests.fakes.client import Script, ok, options, refused, unavailable
from tests.fakes.hostile_upstream import HOSTILE_ANSWERS, REFUSALS, RawUpstream, check_bad_answer

SIDECAR = "http://127.0.0.1:8099/token"
CP = "https://cp.example.svc:8080/token"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sa_file(tmp_path: Path) -> Path:
    path = tmp_path / "sa-token"
    path.write_text("sa-token-one\n")
    return path


def sidecar_source(clock: FakeClock, script: Script, **extra: object) -> TokenSource:
    return TokenSource(sidecar_url=SIDECAR, **options(clock, script, **extra))


# --- resolution order -----------------------------------------------------------------------


def test_from_env_prefers_the_sidecar(clock: FakeClock, sa_file: Path) -> None:
    script = Script(ok("from-sidecar"))
    env = {
        "AMBIENT_TOKEN_SIDECAR_URL": SIDECAR,
        "AMBIENT_CP_TOKEN_URL": CP,
        "AMBIENT_SA_TOKEN_FILE": str(sa_file),
        "BOT_TOKEN": "bot",
    }
    source = TokenSource.from_env(env, **options(clock, script))
    assert source.mode == "sidecar"
    assert source.token() == "from-sidecar"
    assert str(script.requests[0].url) == SIDECAR


def test_from_env_then_the_cp_directly(clock: FakeClock, sa_file: Path) -> None:
    script = Script(ok("direct"))
    env = {"AMBIENT_CP_TOKEN_URL": CP, "AMBIENT_SA_TOKEN_FILE": str(sa_file), "BOT_TOKEN": "b"}
    source = TokenSource.from_env(env, **options(clock, script))
    assert source.mode == "direct"
    assert source.token() == "direct"
    assert script.requests[0].headers["Authorization"] == "Bearer sa-token-one"


def test_from_env_bot_token_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(source_module, "_bot_warned", False)
    caplog.set_level(logging.WARNING, logger="cp_token.client")
    first = TokenSource.from_env({"BOT_TOKEN": "bot-token"})
    TokenSource.from_env({"BOT_TOKEN": "bot-token"})
    assert first.mode == "static"
    assert first.token() == "bot-token"
    warnings = [r for r in caplog.records if "BOT_TOKEN" in r.getMessage()]
    assert len(warnings) == 1
    assert "bot-token" not in caplog.text


def test_from_env_without_any_source_says_what_to_set() -> None:
    with pytest.raises(TokenError, match="AMBIENT_TOKEN_SIDECAR_URL"):
        TokenSource.from_env({})


def test_a_failing_sidecar_never_falls_through_to_bot_token(clock: FakeClock) -> None:
    script = Script(unavailable())
    env = {"AMBIENT_TOKEN_SIDECAR_URL": SIDECAR, "BOT_TOKEN": "bot"}
    source = TokenSource.from_env(env, **options(clock, script))
    with pytest.raises(TokenUnavailable):
        source.token()
    assert script.count > 1  # it retried the sidecar, and only the sidecar


def test_a_missing_sa_token_file_never_falls_through(tmp_path: Path, clock: FakeClock) -> None:
    script = Script(ok("never"))
    env = {
        "AMBIENT_CP_TOKEN_URL": CP,
        "AMBIENT_SA_TOKEN_FILE": str(tmp_path / "absent"),
        "BOT_TOKEN": "bot",
    }
    source = TokenSource.from_env(env, **options(clock, script))
    with pytest.raises(TokenError, match="projected") as err:
        source.token()
    assert not isinstance(err.value, TokenUnavailable)  # not retried: a deployment mistake
    assert script.count == 0


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("AMBIENT_TOKEN_SIDECAR_URL", "http://user:pw@127.0.0.1:8099/token"),
        ("AMBIENT_CP_TOKEN_URL", "ftp://cp.example/token"),
    ],
)
def test_from_env_rejects_bad_urls(variable: str, url: str) -> None:
    with pytest.raises(TokenError, match=variable):
        TokenSource.from_env({variable: url})


def test_user_info_is_refused_before_anything_is_sent(clock: FakeClock) -> None:
    script = Script(ok("never"))
    with pytest.raises(TokenError, match="user-info"):
        TokenSource(cp_url="http://runner:secret@cp.example/token", **options(clock, script))
    assert script.count == 0


def test_exactly_one_origin_is_required() -> None:
    with pytest.raises(TokenError, match="exactly one"):
        TokenSource(sidecar_url=SIDECAR, static_token="x")


# --- requests -------------------------------------------------------------------------------


def test_sidecar_requests_carry_the_header_and_min_ttl(clock: FakeClock) -> None:
    script = Script(ok("t1"))
    source = sidecar_source(clock, script)
    source.token(min_ttl=120.5)
    request = script.requests[0]
    assert request.method == "GET"
    assert request.headers["Ambient-Token-Request"] == "true"
    assert "Authorization" not in request.headers
    assert request.url.params["min_ttl"] == "121"


def test_direct_mode_rereads_the_sa_token_every_fetch(clock: FakeClock, sa_file: Path) -> None:
    script = Script(ok("t1"), ok("t2"))
    source = TokenSource(cp_url=CP, sa_token_file=str(sa_file), **options(clock, script))
    source.fetch()
    sa_file.write_text("sa-token-two")  # kubelet rotated the projected token
    source.fetch()
    auth = [r.headers["Authorization"] for r in script.requests]
    assert auth == ["Bearer sa-token-one", "Bearer sa-token-two"]


def test_an_empty_sa_token_file_is_an_error(clock: FakeClock, sa_file: Path) -> None:
    sa_file.write_text("  \n")
    source = TokenSource(cp_url=CP, sa_token_file=str(sa_file), **options(clock, Script()))
    with pytest.raises(TokenError, match="empty"):
        source.token()


# --- caching --------------------------------------------------------------------------------


def test_token_is_cached_until_the_advisory_window(clock: FakeClock) -> None:
    script = Script(ok("t1", 900), ok("t2", 900))
    source = sidecar_source(clock, script)
    assert source.token() == "t1"
    # the advisory window opens with 10 % of the usable lifetime (900 - 10 s) left, plus the
    # 10 s mandatory window: 99 s before expiry
    clock.advance(800)  # 100 s left
    assert source.token() == "t1"
    assert script.count == 1
    clock.advance(2)  # 98 s left
    assert source.token() == "t2"
    assert script.count == 2


def test_short_lifetimes_use_the_30_second_floor(clock: FakeClock) -> None:
    script = Script(ok("t1", 100), ok("t2", 100))
    source = sidecar_source(clock, script)
    source.token()
    clock.advance(69)
    assert source.token() == "t1"
    clock.advance(2)
    assert source.token() == "t2"


def test_min_ttl_beyond_the_cached_lifetime_fetches(clock: FakeClock) -> None:
    script = Script(ok("t1", 900), ok("t2", 900))
    source = sidecar_source(clock, script)
    source.token()
    clock.advance(400)
    assert source.token(min_ttl=600) == "t2"
    assert script.requests[1].url.params["min_ttl"] == "600"


def test_a_failed_early_refresh_keeps_the_valid_token(clock: FakeClock) -> None:
    script = Script(ok("t1", 100), unavailable(), ok("t2", 100))
    source = sidecar_source(clock, script)
    source.token()
    clock.advance(80)  # 20 s left: refresh due, one attempt, fails
    assert source.token() == "t1"
    assert script.count == 2
    clock.advance(1)
    assert source.token() == "t1"  # paused for 5 s: no new attempt yet
    assert script.count == 2
    clock.advance(5)
    assert source.token() == "t2"


def test_an_expired_token_is_never_returned(clock: FakeClock) -> None:
    script = Script(ok("t1", 100), unavailable())
    source = sidecar_source(clock, script, deadline=10.0)
    source.token()
    clock.advance(101)
    with pytest.raises(TokenUnavailable):
        source.token()


def test_a_token_of_unknown_expiry_is_cached(clock: FakeClock) -> None:
    script = Script(ok("opaque", None))
    source = sidecar_source(clock, script)
    source.token()
    clock.advance(10**6)
    assert source.token() == "opaque"
    assert script.count == 1


def test_invalidate_forces_a_fresh_token_from_the_sidecar(clock: FakeClock) -> None:
    script = Script(ok("t1"), ok("t2"))
    source = sidecar_source(clock, script)
    source.token()
    source.invalidate("some-other-token")  # already replaced: nothing to do
    assert source.token() == "t1"
    source.invalidate("t1")
    assert source.token() == "t2"
    assert [r.method for r in script.requests] == ["GET", "POST"]


async def test_concurrent_awaiters_share_one_fetch(clock: FakeClock) -> None:
    script = Script(ok("shared"))
    script.gate = asyncio.Event()
    source = sidecar_source(clock, script)
    waiters = [asyncio.create_task(source.atoken()) for _ in range(20)]
    await asyncio.sleep(0)
    script.gate.set()
    assert await asyncio.gather(*waiters) == ["shared"] * 20
    assert script.count == 1


async def test_a_cancelled_awaiter_does_not_cancel_the_shared_fetch(clock: FakeClock) -> None:
    script = Script(ok("shared"))
    script.gate = asyncio.Event()
    source = sidecar_source(clock, script)
    first = asyncio.create_task(source.atoken())
    second = asyncio.create_task(source.atoken())
    await asyncio.sleep(0)
    first.cancel()
    script.gate.set()
    assert await second == "shared"


# --- the refresh windows: advisory (one refreshes, the others go on), mandatory (all wait) --

WAIT = 10.0  # real seconds a test waits on another thread before it calls the run broken
LIFETIME = 900  # advisory from 99 s left (10 % of 890 usable + 10), mandatory under 10 s


class Gate:
    """A step of the fake sidecar that blocks its (sync) request until the test opens it."""

    def __init__(self, answer: httpx.Response) -> None:
        self.answer = answer
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.entered.set()
        if not self.opened.wait(2 * WAIT):
            raise AssertionError("the gate was never opened")
        return self.answer


class WaitLock:
    """The source's lock, telling when a caller starts to wait on it (it has then already
    taken note of the refresh it waits for)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waiting = threading.Event()

    def acquire(self, blocking: bool = True) -> bool:
        if blocking and self._lock.locked():
            self.waiting.set()
        return self._lock.acquire(blocking)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def in_thread(pool: ThreadPoolExecutor, call: Callable[[], Any]) -> Future[Any]:
    return pool.submit(call)


def test_advisory_one_thread_refreshes_while_another_gets_the_cached_token_at_once(
    clock: FakeClock,
) -> None:
    gate = Gate(ok("t2", LIFETIME))
    script = Script(ok("t1", LIFETIME), gate)
    source = sidecar_source(clock, script)
    assert source.token() == "t1"
    clock.advance(LIFETIME - 98)  # the advisory window
    with ThreadPoolExecutor(2) as pool:
        refreshing = in_thread(pool, source.token)
        assert gate.entered.wait(WAIT)  # its refresh is in flight, held at the gate
        other = in_thread(pool, source.token)
        assert other.result(WAIT) == "t1"  # before the gate opens: it did not wait
        assert not refreshing.done()
        gate.opened.set()
        assert refreshing.result(WAIT) == "t2"
    assert script.count == 2
    assert source.token() == "t2"


async def test_advisory_one_task_refreshes_while_another_gets_the_cached_token_at_once(
    clock: FakeClock,
) -> None:
    script = Script(ok("t1", LIFETIME), ok("t2", LIFETIME))
    source = sidecar_source(clock, script)
    assert await source.atoken() == "t1"
    script.gate = asyncio.Event()
    clock.advance(LIFETIME - 98)
    refreshing = asyncio.create_task(source.atoken())
    await asyncio.sleep(0)  # its refresh is in flight, held at the gate
    other = asyncio.create_task(source.atoken())
    for _ in range(5):
        await asyncio.sleep(0)
    assert other.done() and other.result() == "t1"
    assert not refreshing.done()
    script.gate.set()
    assert await refreshing == "t2"
    assert script.count == 2


async def test_a_failed_advisory_refresh_keeps_the_token_async(clock: FakeClock) -> None:
    script = Script(ok("t1", LIFETIME), unavailable(), ok("t2", LIFETIME))
    source = sidecar_source(clock, script)
    await source.atoken()
    clock.advance(LIFETIME - 50)
    assert await source.atoken() == "t1"  # one attempt, failed: the cached token
    assert await source.atoken() == "t1"  # paused: no new attempt
    assert script.count == 2
    clock.advance(5)
    assert await source.atoken() == "t2"


def test_mandatory_threads_wait_and_share_one_fetch(clock: FakeClock) -> None:
    gate = Gate(ok("t2", LIFETIME))
    script = Script(ok("t1", LIFETIME), gate)
    source = sidecar_source(clock, script)
    lock = WaitLock()
    source._lock = lock  # type: ignore[assignment]
    assert source.token() == "t1"
    clock.advance(LIFETIME - 5)  # 5 s left: the cached token is not handed out
    with ThreadPoolExecutor(2) as pool:
        first = in_thread(pool, source.token)
        assert gate.entered.wait(WAIT)
        second = in_thread(pool, source.token)
        assert lock.waiting.wait(WAIT)  # it waits for the refresh in flight
        assert not first.done() and not second.done()
        gate.opened.set()
        assert first.result(WAIT) == "t2"
        assert second.result(WAIT) == "t2"
    assert script.count == 2  # one fetch for both


async def test_mandatory_tasks_wait_and_share_one_fetch(clock: FakeClock) -> None:
    script = Script(ok("t1", LIFETIME), ok("t2", LIFETIME))
    source = sidecar_source(clock, script)
    assert await source.atoken() == "t1"
    script.gate = asyncio.Event()
    clock.advance(LIFETIME - 5)
    waiters = [asyncio.create_task(source.atoken()) for _ in range(2)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)  # both wait: 5 s left is not handed out
    script.gate.set()
    assert await asyncio.gather(*waiters) == ["t2", "t2"]
    assert script.count == 2


def test_mandatory_a_failed_refresh_raises_though_the_token_is_still_valid(
    clock: FakeClock,
) -> None:
    script = Script(ok("t1", LIFETIME), unavailable())
    source = sidecar_source(clock, script, deadline=3.0)
    source.token()
    expiry = clock.monotonic() + LIFETIME
    clock.advance(LIFETIME - 9)  # 9 s left: under the 10 s mandatory window
    with pytest.raises(TokenUnavailable, match="gave up"):
        source.token()
    assert script.count > 2  # retried within the deadline first
    assert clock.monotonic() < expiry  # t1 was still valid, and not handed out


async def test_mandatory_a_failed_refresh_raises_async(clock: FakeClock) -> None:
    script = Script(ok("t1", LIFETIME), unavailable())
    source = sidecar_source(clock, script, deadline=3.0)
    await source.atoken()
    expiry = clock.monotonic() + LIFETIME
    clock.advance(LIFETIME - 9)
    with pytest.raises(TokenUnavailable):
        await source.atoken()
    assert clock.monotonic() < expiry


def test_mandatory_waiting_threads_share_the_failure_too(clock: FakeClock) -> None:
    gate = Gate(unavailable())
    script = Script(ok("t1", LIFETIME), gate)
    source = sidecar_source(clock, script, deadline=3.0)
    lock = WaitLock()
    source._lock = lock  # type: ignore[assignment]
    source.token()
    clock.advance(LIFETIME - 5)
    with ThreadPoolExecutor(2) as pool:
        first = in_thread(pool, source.token)
        assert gate.entered.wait(WAIT)
        second = in_thread(pool, source.token)
        assert lock.waiting.wait(WAIT)
        gate.opened.set()
        failures = [f.exception(WAIT) for f in (first, second)]
    assert isinstance(failures[0], TokenUnavailable)
    assert failures[1] is failures[0]  # the same refresh's error: not a second retry loop
    assert script.count > 2  # that one refresh retried within the deadline


def test_min_ttl_is_best_effort_when_the_refresh_fails(clock: FakeClock) -> None:
    """A caller asking for more than the cached token has left waits for one attempt, and
    gets the still valid cached token when it fails (outside the mandatory window)."""
    script = Script(ok("t1", LIFETIME), unavailable(), ok("t2", LIFETIME))
    source = sidecar_source(clock, script)
    source.token()
    clock.advance(400)  # 500 s left: fresh for most callers
    assert source.token() == "t1"
    assert source.token(min_ttl=600) == "t1"  # one attempt failed: the cached token
    assert script.count == 2
    assert source.token(min_ttl=600) == "t1"  # within the pause: no new attempt
    clock.advance(5)
    assert source.token(min_ttl=600) == "t2"


async def test_min_ttl_is_best_effort_async(clock: FakeClock) -> None:
    script = Script(ok("t1", LIFETIME), unavailable())
    source = sidecar_source(clock, script)
    await source.atoken()
    clock.advance(400)
    assert await source.atoken(min_ttl=600) == "t1"
    assert script.count == 2


def test_a_token_the_mandatory_refresh_brings_is_handed_out_whatever_it_has_left(
    clock: FakeClock,
) -> None:
    """The origin's best, just now (a sidecar riding out a CP outage hands back its last
    token): handed out; the next call asks again."""
    script = Script(ok("t1", LIFETIME), ok("t1", 8), ok("t1", 7))
    source = sidecar_source(clock, script)
    source.token()
    clock.advance(LIFETIME - 8)
    assert source.token() == "t1"
    assert script.count == 2
    clock.advance(1)
    assert source.token() == "t1"
    assert script.count == 3


def test_refresh_settings_out_of_range_are_refused(clock: FakeClock) -> None:
    with pytest.raises(TokenError, match="refresh_fraction"):
        sidecar_source(clock, Script(), refresh_fraction=1.5)
    with pytest.raises(TokenError, match="refresh_before"):
        sidecar_source(clock, Script(), refresh_before=-1.0)


# --- retries --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        unavailable(503),
        unavailable(502),
        unavailable(429),
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("slow"),
        httpx.Response(200, text="<html>maintenance</html>"),
        httpx.Response(200, json={"token_type": "Bearer"}),
    ],
    ids=["503", "502", "429", "connect", "timeout", "html", "no-token"],
)
def test_transient_failures_are_retried(
    clock: FakeClock, failure: httpx.Response | Exception
) -> None:
    script = Script(failure, failure, ok("t1"))
    source = sidecar_source(clock, script)
    started = clock.monotonic()
    assert source.token() == "t1"
    assert script.count == 3
    assert clock.monotonic() > started  # it backed off (on the injected clock)


async def test_async_retries_too(clock: FakeClock) -> None:
    script = Script(unavailable(), httpx.ConnectError("refused"), ok("t1"))
    source = sidecar_source(clock, script)
    assert await source.atoken() == "t1"
    assert script.count == 3


def test_retry_after_seconds_is_honoured(clock: FakeClock) -> None:
    script = Script(unavailable(429, retry_after="7"), ok("t1"))
    source = sidecar_source(clock, script)
    started = clock.monotonic()
    source.token()
    assert clock.monotonic() - started >= 7


def test_retry_after_http_date_is_honoured(clock: FakeClock) -> None:
    when = email.utils.formatdate(clock.time() + 12, usegmt=True)
    script = Script(unavailable(503, retry_after=when), ok("t1"))
    source = sidecar_source(clock, script)
    started = clock.monotonic()
    source.token()
    # at least the date, and up to the client's backoff cap (5 s) of jitter on top
    assert 11 <= clock.monotonic() - started <= 12 + 5 + 1


def test_the_deadline_bounds_all_retries(clock: FakeClock) -> None:
    script = Script(unavailable())
    source = sidecar_source(clock, script, deadline=20.0)
    started = clock.monotonic()
    with pytest.raises(TokenUnavailable, match="gave up") as err:
        source.token()
    assert clock.monotonic() - started <= 20.0
    assert script.count > 3
    assert SIDECAR in str(err.value)


def test_a_retry_after_beyond_the_deadline_gives_up_at_once(clock: FakeClock) -> None:
    script = Script(unavailable(503, retry_after="3600"))
    source = sidecar_source(clock, script, deadline=30.0)
    with pytest.raises(TokenUnavailable) as err:
        source.token()
    assert script.count == 1
    assert err.value.retry_after == 3600


@pytest.mark.parametrize("status", [401, 403])
def test_refusals_raise_at_once_with_the_description(clock: FakeClock, status: int) -> None:
    script = Script(refused(status, "serviceaccount default is not a session runner"))
    source = sidecar_source(clock, script)
    with pytest.raises(TokenRejected) as err:
        source.token()
    assert script.count == 1
    assert err.value.status == status
    assert err.value.description == "serviceaccount default is not a session runner"
    assert SIDECAR in str(err.value)


def test_refusal_messages_never_carry_the_sa_token(clock: FakeClock, sa_file: Path) -> None:
    script = Script(refused(401, "token expired"))
    source = TokenSource(cp_url=CP, sa_token_file=str(sa_file), **options(clock, script))
    with pytest.raises(TokenRejected) as err:
        source.token()
    assert "sa-token-one" not in str(err.value)


def test_redirects_are_not_followed(clock: FakeClock, sa_file: Path) -> None:
    script = Script(httpx.Response(302, headers={"Location": "http://elsewhere.example/x"}))
    source = TokenSource(cp_url=CP, sa_token_file=str(sa_file), **options(clock, script))
    with pytest.raises(TokenError, match="not followed") as err:
        source.token()
    assert not isinstance(err.value, TokenUnavailable)
    assert script.count == 1


def test_other_client_errors_are_not_retried(clock: FakeClock) -> None:
    script = Script(httpx.Response(404, text="not found"))
    source = sidecar_source(clock, script)
    with pytest.raises(TokenError, match="404"):
        source.token()
    assert script.count == 1


def test_fetch_once_does_not_retry(clock: FakeClock) -> None:
    script = Script(unavailable(503, retry_after="4"), ok("t1"))
    source = sidecar_source(clock, script)
    with pytest.raises(TokenUnavailable) as err:
        source.fetch_once()
    assert err.value.retry_after == 4
    assert script.count == 1


def test_fetched_token_tracks_expiry_on_the_monotonic_clock(clock: FakeClock) -> None:
    script = Script(ok("t1", 900))
    source = sidecar_source(clock, script)
    fetched = source.fetch()
    assert fetched.fetched_at == clock.monotonic()
    assert fetched.remaining(clock.monotonic() + 100) == 800
    assert fetched.expires_at == "2027-01-15T08:15:00Z"
    assert "t1" not in repr(fetched)


def test_static_token_needs_no_network() -> None:
    source = TokenSource(static_token="dev")
    assert source.token() == "dev"
    assert source.fetch().expires_in is None


# --- folded from test_source_hostile.py ----------------------------------------

CASES = sorted(HOSTILE_ANSWERS)


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    with RawUpstream() as server:
        yield server


@pytest.fixture
def jwt_sa_file(tmp_path: Path) -> Path:
    path = tmp_path / "sa"
    path.write_text("sa.jwt.token")
    return path


@pytest.mark.parametrize("case", CASES)
def test_the_client_library_sync_direct(
    case: str, upstream: RawUpstream, jwt_sa_file: Path
) -> None:
    clock = FakeClock()  # retries wait on it: instant
    source = TokenSource(
        cp_url=upstream.url(case),
        sa_token_file=str(jwt_sa_file),
        clock=clock,
        rand=random.Random(1).random,
        timeout=5,
    )
    with source, pytest.raises(Exception) as info:
        source.token()
    check_bad_answer(info.value, case)
    if case not in REFUSALS:
        assert upstream.count(case) >= 2  # retried as the unavailable path, to the deadline


@pytest.mark.parametrize("case", CASES)
async def test_the_client_library_async_through_a_sidecar_url(
    case: str, upstream: RawUpstream
) -> None:
    source = TokenSource(
        sidecar_url=upstream.url(case), clock=FakeClock(), rand=random.Random(2).random
    )
    async with source:
        with pytest.raises(Exception) as info:
            await source.atoken()
    check_bad_answer(info.value, case)


@pytest.mark.parametrize("case", ["expires-in-1e308", "expires-in-400-digits"])
def test_an_absurd_lifetime_is_a_bad_answer_not_year_9999(
    case: str, upstream: RawUpstream, jwt_sa_file: Path
) -> None:
    """Before: 1e308 was served as expiring in year 9999 and never refreshed; 400 digits
    overflowed the expiry arithmetic."""
    source = TokenSource(
        cp_url=upstream.url(case), sa_token_file=str(jwt_sa_file), clock=FakeClock(), timeout=5
    )
    with pytest.raises(TokenUnavailable, match="expires_in"):
        source.fetch_once()


# --- the shared reading, piece by piece ------------------------------------------------------


# --- what the sidecar relays to its callers ---------------------------------------------------
