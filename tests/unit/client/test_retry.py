"""The retry primitives: Retry-After parsing and the backoff envelope."""

from __future__ import annotations

import email.utils
import itertools
import random

from hypothesis import given
from hypothesis import strategies as st

from cp_token.client._retry import RetryPolicy, parse_retry_after

NOW = 1_800_000_000.0


def test_retry_after_seconds() -> None:
    assert parse_retry_after("5", NOW) == 5.0
    assert parse_retry_after(" 0 ", NOW) == 0.0


def test_retry_after_http_date() -> None:
    header = email.utils.formatdate(NOW + 90, usegmt=True)
    assert parse_retry_after(header, NOW) == 90.0


def test_retry_after_in_the_past_means_now() -> None:
    header = email.utils.formatdate(NOW - 90, usegmt=True)
    assert parse_retry_after(header, NOW) == 0.0


def test_retry_after_garbage_is_ignored() -> None:
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after("-3", NOW) is None
    assert parse_retry_after(None, NOW) is None


@given(st.integers(min_value=1, max_value=60), st.integers(min_value=0, max_value=2**32))
def test_backoff_is_full_jitter_under_the_cap(failures: int, seed: int) -> None:
    policy = RetryPolicy(initial=0.5, cap=5.0)
    wait = policy.backoff(failures, random.Random(seed).random)
    assert 0.0 <= wait <= min(5.0, 0.5 * 2 ** (failures - 1))


def test_backoff_grows_then_caps() -> None:
    policy = RetryPolicy(initial=0.5, cap=5.0)
    assert [policy.backoff(n, lambda: 1.0) for n in (1, 2, 3, 4, 5, 6)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        5.0,
        5.0,
    ]


def test_the_retrier_waits_on_its_clock_then_gives_up_at_the_deadline() -> None:
    from cp_token.client._errors import TokenUnavailable
    from cp_token.client._retry import Retrier
    from cp_token.runtime.clock import FakeClock

    clock = FakeClock()
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock.advance(seconds)

    def attempt() -> str:
        raise TokenUnavailable("down", "http://cp/token")

    retrier = Retrier(RetryPolicy(deadline=3.0, initial=1.0, cap=1.0), clock, lambda: 1.0)
    try:
        retrier.call(attempt, sleep)
    except TokenUnavailable as exc:
        assert "gave up after 4 attempt(s)" in str(exc)
    else:
        raise AssertionError("no TokenUnavailable")
    assert waits == [1.0, 1.0, 1.0]


async def test_the_async_retrier_returns_the_first_success() -> None:
    from cp_token.client._errors import TokenUnavailable
    from cp_token.client._retry import Retrier
    from cp_token.runtime.clock import FakeClock

    clock = FakeClock()
    calls: list[float] = []

    async def attempt() -> str:
        calls.append(clock.monotonic())
        if len(calls) < 3:
            raise TokenUnavailable("down", "http://cp/token", retry_after=2.0)
        return "token"

    retrier = Retrier(RetryPolicy(deadline=30.0, initial=0.5, cap=5.0), clock, lambda: 0.0)
    assert await retrier.acall(attempt) == "token"
    assert [b - a for a, b in itertools.pairwise(calls)] == [2.0, 2.0]  # Retry-After


def test_a_retry_after_is_a_minimum_with_jitter_on_top_within_the_cap() -> None:
    """Clients told ``Retry-After: 4`` by one server spread over 4-8 s (cap 5 s on top);
    before, every one of them waited exactly 4 s."""
    policy = RetryPolicy(initial=0.5, cap=5.0)
    waits = [policy.backoff(1, random.Random(seed).random, 4.0) for seed in range(200)]
    assert all(4.0 <= w <= 8.0 for w in waits)
    assert len({round(w) for w in waits}) >= 4
    long = [policy.backoff(1, random.Random(seed).random, 20.0) for seed in range(200)]
    assert all(20.0 <= w <= 25.0 for w in long) and max(long) > 24
