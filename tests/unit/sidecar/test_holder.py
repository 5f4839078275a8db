"""TokenHolder: every transition and timing rule, on a fake clock with seeded jitter."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cp_token.client import FetchedToken
from cp_token.runtime.clock import FakeClock
from sidecar.holder import HolderPolicy, Rejection, State, TokenHolder


def fetched(clock: FakeClock, expires_in: int | None = 900, name: str = "t") -> FetchedToken:
    return FetchedToken(name, expires_in, None, clock.monotonic())


def holder_with(clock: FakeClock, rand: float | None = None, **policy: float) -> TokenHolder:
    draw = (lambda: rand) if rand is not None else random.Random(3).random
    return TokenHolder(clock, HolderPolicy(**policy), rand=draw)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_starts_empty_and_due(clock: FakeClock) -> None:
    holder = holder_with(clock)
    assert holder.state is State.EMPTY
    assert not holder.ready
    assert holder.current() is None
    assert holder.next_fetch_at() <= clock.monotonic()  # type: ignore[operator]
    assert holder.should_fetch(60)
    assert holder.retry_after() == 1


def test_fetching_then_fresh(clock: FakeClock) -> None:
    holder = holder_with(clock)
    holder.begin_fetch()
    assert holder.state is State.FETCHING
    assert holder.next_fetch_at() is None
    assert holder.should_fetch(60)  # join the fetch in progress
    token = fetched(clock)
    holder.succeeded(token)
    assert holder.state is State.FRESH
    assert holder.ready
    assert holder.current() is token
    assert holder.remaining() == 900


def test_full_cycle_fresh_stale_refreshing_fresh(clock: FakeClock) -> None:
    holder = holder_with(clock, rand=0.5)  # no jitter: refresh at exactly half-life
    holder.succeeded(fetched(clock))
    assert holder.next_fetch_at() == clock.monotonic() + 450
    clock.advance(449)
    assert holder.state is State.FRESH
    clock.advance(1)
    assert holder.state is State.STALE
    holder.begin_fetch()
    assert holder.state is State.REFRESHING
    assert holder.ready  # the held token is still served while refreshing
    holder.succeeded(fetched(clock, name="t2"))
    assert holder.state is State.FRESH
    assert holder.current().token == "t2"  # type: ignore[union-attr]


@given(st.floats(min_value=0.0, max_value=1.0), st.integers(min_value=20, max_value=100_000))
def test_refresh_is_at_the_fraction_with_10_percent_jitter(draw: float, lifetime: int) -> None:
    clock = FakeClock()
    holder = TokenHolder(clock, HolderPolicy(), rand=lambda: draw)
    holder.succeeded(fetched(clock, lifetime))
    delay = holder.next_fetch_at() - clock.monotonic()  # type: ignore[operator]
    half = lifetime * 0.5
    assert half * 0.9 - 1e-6 <= delay <= half * 1.1 + 1e-6


def test_refresh_fraction_near_one_never_overshoots_expiry(clock: FakeClock) -> None:
    holder = holder_with(clock, rand=1.0, refresh_fraction=0.99)
    holder.succeeded(fetched(clock, 100))
    assert holder.next_fetch_at() == pytest.approx(clock.monotonic() + 99)


def test_a_zero_lifetime_token_does_not_cause_a_hot_loop(clock: FakeClock) -> None:
    holder = holder_with(clock)
    holder.succeeded(fetched(clock, 0))
    assert holder.next_fetch_at() >= clock.monotonic() + 1  # type: ignore[operator]
    assert not holder.ready


def test_expired_once_the_lifetime_is_over(clock: FakeClock) -> None:
    holder = holder_with(clock)
    holder.succeeded(fetched(clock, 100))
    clock.advance(99.9)
    assert holder.ready
    clock.advance(0.1)
    assert holder.state is State.EXPIRED
    assert not holder.ready
    assert holder.current() is None
    assert holder.remaining() is None


def test_backoff_doubles_up_to_the_cap(clock: FakeClock) -> None:
    holder = holder_with(clock, rand=1.0)  # the top of every jitter window
    holder.succeeded(fetched(clock, 3600))  # held all along: the schedule may stretch
    delays = []
    for _ in range(9):
        holder.begin_fetch()
        holder.failed("connection refused")
        delays.append(holder.next_fetch_at() - clock.monotonic())  # type: ignore[operator]
        clock.advance(delays[-1])  # the next attempt is the scheduled one
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert holder.failures == 9
    assert holder.last_error == "connection refused"
    assert holder.ready


def test_with_nothing_held_the_backoff_stops_at_2_seconds(clock: FakeClock) -> None:
    """Nothing to serve (and no token file): a CP that heals is found within 2 s, even by a
    pod whose only consumer reads the file."""
    holder = holder_with(clock, rand=1.0)
    delays = []
    for _ in range(6):
        holder.begin_fetch()
        holder.failed("connection refused")
        delays.append(holder.next_fetch_at() - clock.monotonic())  # type: ignore[operator]
        clock.advance(delays[-1])
    assert delays == [1, 2, 2, 2, 2, 2]
    assert holder.failures == 6
    holder.failed("503", retry_after=4)  # the CP's Retry-After still comes first ...
    # ... with jitter on top, at most the empty backoff's cap (2 s; this draw is the top)
    assert holder.next_fetch_at() == clock.monotonic() + 4 + 2


@given(st.integers(min_value=1, max_value=30), st.floats(min_value=0.0, max_value=1.0))
def test_backoff_is_full_jitter_with_a_floor(failures: int, draw: float) -> None:
    clock = FakeClock()
    holder = TokenHolder(clock, HolderPolicy(), rand=lambda: draw)
    holder.succeeded(fetched(clock, 100_000))
    for _ in range(failures):
        holder.failed("x")
    delay = holder.next_fetch_at() - clock.monotonic()  # type: ignore[operator]
    ceiling = min(60.0, 2.0 ** (failures - 1))
    assert 0.25 <= delay <= max(0.25, ceiling)


def test_retry_after_is_honoured_up_to_a_cap(clock: FakeClock) -> None:
    holder = holder_with(clock, rand=0.0)
    holder.succeeded(fetched(clock, 3600))  # a token held: the CP's hint up to 60 s
    holder.failed("503", retry_after=17)
    assert holder.next_fetch_at() == clock.monotonic() + 17
    holder.failed("503", retry_after=100_000)  # a proxy's absurd value stalls nothing
    assert holder.next_fetch_at() == clock.monotonic() + 60


@pytest.mark.parametrize(("hint", "honoured"), [(3, 3), (17, 5), (100_000, 5)])
def test_with_nothing_held_retry_after_is_honoured_up_to_5_s(
    clock: FakeClock, hint: float, honoured: float
) -> None:
    holder = holder_with(clock, rand=0.0)
    holder.failed("503", retry_after=hint)
    assert holder.next_fetch_at() == clock.monotonic() + honoured
    assert holder.retry_after() == honoured
    clock.advance(honoured - 0.01)
    assert not holder.should_fetch(0)  # a request waits the hint out too ...
    clock.advance(0.01)
    assert holder.should_fetch(0)  # ... but never longer than the cap


def test_a_retry_is_never_scheduled_past_expiry(clock: FakeClock) -> None:
    holder = holder_with(clock, rand=1.0)
    token = fetched(clock, 100)
    holder.succeeded(token)
    clock.advance(90)
    holder.failed("503", retry_after=3600)  # the token would be gone long before
    assert holder.next_fetch_at() == token.expiry - 1  # type: ignore[operator]
    clock.advance(9.5)  # half a second left
    holder.failed("503", retry_after=3600)
    retry = holder.next_fetch_at()
    assert retry is not None and clock.monotonic() < retry <= token.expiry  # type: ignore[operator]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["ok", "fail", "reject"]),
            st.floats(min_value=0.0, max_value=400.0),
            st.one_of(st.none(), st.floats(min_value=0.0, max_value=10_000.0)),
        ),
        max_size=30,
    ),
    st.integers(min_value=0, max_value=2**32),
)
def test_with_a_token_held_no_retry_lands_after_its_expiry(
    events: list[tuple[str, float, float | None]], seed: int
) -> None:
    clock = FakeClock()
    holder = TokenHolder(clock, HolderPolicy(), rand=random.Random(seed).random)
    for kind, wait, retry_after in events:
        clock.advance(wait)
        holder.begin_fetch()
        if kind == "ok":
            holder.succeeded(fetched(clock, 300))
        elif kind == "fail":
            holder.failed("x", retry_after)
        else:
            holder.rejected(403, "no")
        held = holder.current()
        due = holder.next_fetch_at()
        assert due is not None and due > clock.monotonic()
        if held is not None:
            assert due <= held.expiry  # type: ignore[operator]


def test_rejection_is_retried_slowly_and_relayed(clock: FakeClock) -> None:
    holder = holder_with(clock)
    holder.begin_fetch()
    holder.rejected(403, "not a session runner")
    assert holder.rejection == Rejection(403, "not a session runner")
    assert holder.state is State.EMPTY
    delay = holder.next_fetch_at() - clock.monotonic()  # type: ignore[operator]
    assert 30 <= delay <= 60
    assert not holder.should_fetch(60)  # no hammering the CP from GETs meanwhile


def test_a_success_clears_rejection_and_failures(clock: FakeClock) -> None:
    holder = holder_with(clock)
    holder.rejected(401, "expired")
    holder.failed("down")
    assert holder.rejection is None  # the latest answer was not a refusal
    holder.rejected(401, "expired")
    holder.succeeded(fetched(clock))
    assert holder.rejection is None
    assert holder.failures == 0
    assert holder.last_error is None


def test_should_fetch_for_min_ttl(clock: FakeClock) -> None:
    holder = holder_with(clock)
    holder.succeeded(fetched(clock, 900))
    assert not holder.should_fetch(60)
    assert not holder.should_fetch(900)
    clock.advance(1)
    assert not holder.should_fetch(901)  # fetched moments ago, living 900 s: no longer anew
    assert holder.should_fetch(900)  # a fresh one would have 900 s: fetch
    clock.advance(5)
    assert holder.should_fetch(901)


def test_min_ttl_within_5_s_fetches_unless_the_last_token_was_already_shorter(
    clock: FakeClock,
) -> None:
    holder = holder_with(clock)
    holder.succeeded(fetched(clock, 100))
    clock.advance(2)  # 98 s left
    assert holder.should_fetch(99)  # the CP issues 100 s tokens: a fetch gives what is asked
    assert not holder.should_fetch(150)  # it gave 100 s moments ago: serve the held one
    holder.begin_fetch()
    holder.succeeded(fetched(clock, 100))
    assert not holder.should_fetch(99)  # now held with 100 s left


def test_with_a_token_held_min_ttl_respects_the_backoff(clock: FakeClock) -> None:
    holder = holder_with(clock, rand=1.0)
    holder.succeeded(fetched(clock, 100))
    clock.advance(60)
    holder.begin_fetch()
    holder.failed("down")  # next retry in 1 s
    assert not holder.should_fetch(80)  # the held token is served meanwhile
    clock.advance(1)
    assert holder.should_fetch(80)


def test_with_nothing_held_a_request_fetches_at_once_whatever_the_backoff(
    clock: FakeClock,
) -> None:
    holder = holder_with(clock, rand=1.0)
    for _ in range(7):
        holder.failed("down")  # the background retry is 2 s away
    assert holder.next_fetch_at() == clock.monotonic() + 2
    assert not holder.should_fetch(0)  # the last attempt was just now: at most one a second
    assert holder.retry_after() == 1  # ask again in a second
    clock.advance(1)
    assert holder.should_fetch(0) and holder.should_force()
    holder.begin_fetch()
    holder.failed("down")
    assert holder.failures == 7  # an early attempt is not a step of the backoff
    assert holder.next_fetch_at() == clock.monotonic() + 1  # the schedule stands
    clock.advance(1)
    holder.begin_fetch()
    holder.succeeded(fetched(clock))
    assert holder.ready and holder.failures == 0


def test_with_nothing_held_a_request_still_waits_out_the_cps_retry_after(
    clock: FakeClock,
) -> None:
    holder = holder_with(clock, rand=0.0)
    holder.failed("429", retry_after=3)
    clock.advance(1)
    assert not holder.should_fetch(0)
    assert holder.retry_after() == 2
    clock.advance(2)
    assert holder.should_fetch(0)


def _outage(holder: TokenHolder, clock: FakeClock, until: float, requests: bool) -> None:
    """Drive the holder as the refresher and (optionally) a consumer polling every 0.1 s
    would, with every fetch failing, until monotonic ``until``."""
    while clock.monotonic() < until:
        due = holder.next_fetch_at()
        if due is not None and due <= clock.monotonic():
            holder.begin_fetch()
            holder.failed("connection refused")
        elif requests and holder.should_fetch(60):
            holder.begin_fetch()
            holder.failed("connection refused")
        elif requests:
            clock.advance(0.1)
        else:
            clock.advance(max(0.01, (due or 0) - clock.monotonic()))


@pytest.mark.parametrize("requests", [False, True])
def test_an_outage_longer_than_the_token_keeps_the_schedule_within_2_s(
    requests: bool,
) -> None:
    clock = FakeClock()
    holder = TokenHolder(clock, HolderPolicy(), rand=lambda: 1.0)  # the top of every window
    holder.succeeded(fetched(clock, 10))
    start = clock.monotonic()
    _outage(holder, clock, start + 25, requests)  # 25 s without the CP, token of 10 s
    assert not holder.ready
    # scheduled attempts at 5.5, 6.5 and 8.5 (token held: 1, 2, 4 s apart), the last chances
    # at 9 and 10 (not steps of the backoff), then, nothing held, every 2 s from 12 to 24:
    # the 4 s draw made while the token was held (for 12.5) is pulled in once it expired
    assert holder.failures == 10
    assert holder.next_fetch_at() == pytest.approx(start + 26, abs=0.01)


def test_a_consumer_gets_a_token_within_a_second_after_a_long_outage() -> None:
    clock = FakeClock()
    holder = TokenHolder(clock, HolderPolicy(), rand=random.Random(2).random)
    holder.succeeded(fetched(clock, 10))
    healed = clock.monotonic() + 25
    _outage(holder, clock, healed, requests=True)
    while not holder.ready:  # the CP is back: the consumer's next request fetches
        if holder.should_fetch(60):
            holder.begin_fetch()
            holder.succeeded(fetched(clock, 10))
        else:
            clock.advance(0.1)
    assert clock.monotonic() - healed <= 1.0 + 1e-6


def test_a_changed_sa_token_file_after_a_refusal_is_tried_at_once(clock: FakeClock) -> None:
    holder = holder_with(clock)
    holder.begin_fetch()
    holder.rejected(401, "token invalidated")
    clock.advance(1)
    assert not holder.should_fetch(60)
    holder.credentials_changed()
    assert holder.next_fetch_at() == clock.monotonic()
    assert holder.should_fetch(60)
    assert holder.rejection is not None  # relayed until the new attempt answers
    holder.begin_fetch()
    holder.succeeded(fetched(clock))
    assert holder.ready and holder.rejection is None


def test_credentials_changed_without_a_refusal_changes_nothing(clock: FakeClock) -> None:
    holder = holder_with(clock, rand=0.5)
    holder.succeeded(fetched(clock, 100))
    due = holder.next_fetch_at()
    holder.credentials_changed()
    assert holder.next_fetch_at() == due


def test_unknown_expiry_is_always_valid_and_refreshed_periodically(clock: FakeClock) -> None:
    holder = holder_with(clock, rand=0.5)
    holder.succeeded(fetched(clock, None))
    assert holder.remaining() is None
    assert not holder.should_fetch(10**6)
    assert holder.next_fetch_at() == clock.monotonic() + 300
    clock.advance(10**7)
    assert holder.ready


def test_force_is_refused_within_5_seconds_of_the_last_attempt(clock: FakeClock) -> None:
    holder = holder_with(clock)
    assert holder.should_force()
    holder.begin_fetch()
    assert holder.should_force()  # join
    holder.succeeded(fetched(clock))
    clock.advance(4.9)
    assert not holder.should_force()
    clock.advance(0.1)
    assert holder.should_force()
    holder.begin_fetch()
    holder.failed("down")
    assert not holder.should_force()  # a failed attempt counts too


def test_retry_after_hint_is_whole_seconds_at_least_one(clock: FakeClock) -> None:
    holder = holder_with(clock, rand=0.0)
    holder.failed("x", retry_after=2.2)
    assert holder.retry_after() == 3
    clock.advance(2.2)
    assert holder.retry_after() == 1
    assert math.isfinite(holder.retry_after())


def test_serving_reads_token_and_lifetime_at_one_instant(clock: FakeClock) -> None:
    holder = holder_with(clock)
    assert holder.serving() is None
    token = fetched(clock, 100)
    holder.succeeded(token)
    clock.advance(30.5)
    assert holder.serving() == (token, 69.5)
    clock.advance(69.5)
    assert holder.serving() is None


# --- jitter on Retry-After (SPEC "Riding out faults") ---------------------------------------


@given(st.integers(min_value=0, max_value=2**32), st.floats(min_value=0.0, max_value=30.0))
def test_the_advertised_retry_after_spreads_over_n_to_2n(seed: int, wait: float) -> None:
    clock = FakeClock()
    holder = TokenHolder(clock, HolderPolicy(), rand=random.Random(seed).random)
    holder.failed("503", retry_after=wait)
    n = holder.retry_after()
    assert n <= holder.advertised_retry_after() <= 2 * n


def test_pods_told_the_same_retry_after_do_not_come_back_in_the_same_second() -> None:
    """300 sidecars told ``Retry-After: 10`` (a token held) and their consumers told the
    sidecars' own N: before, every sidecar retried at exactly 10 s and every 503 said N."""
    retries, advertised = set(), set()
    for seed in range(300):
        clock = FakeClock()
        held = TokenHolder(clock, HolderPolicy(), rand=random.Random(seed).random)
        held.succeeded(fetched(clock, 3600))
        held.failed("503", retry_after=10)
        due = held.next_fetch_at() - clock.monotonic()  # type: ignore[operator]
        assert 10 <= due <= 20  # the CP's wait as a minimum, jitter on top
        retries.add(math.floor(due))
        dark = TokenHolder(clock, HolderPolicy(), rand=random.Random(seed).random)
        dark.failed("503", retry_after=4)
        advertised.add(dark.advertised_retry_after())
    assert len(retries) >= 8
    assert advertised == {4, 5, 6, 7, 8}


# --- after a refusal -------------------------------------------------------------------------


def test_after_a_refusal_a_request_asks_again_once_5_s_have_passed(clock: FakeClock) -> None:
    """A ServiceAccount labelled a moment too late (before: refused until the 30-60 s
    retry or a changed SA token file)."""
    holder = holder_with(clock)
    holder.begin_fetch()
    holder.rejected(403, "not managed")
    clock.advance(4.9)
    assert not holder.should_fetch(60) and not holder.should_force()
    clock.advance(0.1)
    assert holder.should_fetch(60) and holder.should_force()
    holder.begin_fetch()
    holder.rejected(403, "not managed")  # asked: the next ask is 5 s later again
    assert not holder.should_fetch(60)
    # with a token held that no longer has min_ttl left, the same rule
    holder.begin_fetch()
    holder.succeeded(fetched(clock, 100))
    clock.advance(60)
    holder.begin_fetch()
    holder.rejected(403, "not managed")
    clock.advance(4)
    assert not holder.should_fetch(60)
    clock.advance(1)
    assert holder.should_fetch(60)
