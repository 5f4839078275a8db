"""The one backoff policy: capped exponential with full jitter, a floor, Retry-After as a minimum;
the Pacer shared by every caller of one dependency; Retry-After read from an untrusted answer."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cp_token.runtime.backoff import Backoff, Pacer, parse_retry_after
from cp_token.runtime.clock import FakeClock


@pytest.mark.parametrize(
    "value",
    [
        *("9" * 400, "¹", "²⁰", "١٢", " 9999999999 ", "x" * 10_000),
        *("Mon, 01 Jan 99999999999999999999 00:00:00 GMT", "Fri, 31 Dec 99999 23:59:59 GMT"),
        "Mon, 01 Jan 2000 00:00:00 +9999",
    ],
)
def test_retry_after_that_is_not_a_sane_number_is_absent(value: str) -> None:
    assert parse_retry_after(value, 1.7e9) is None


def test_retry_after_sane_values_still_count() -> None:
    assert parse_retry_after("5", 0) == 5.0
    assert parse_retry_after("999999999", 0) == 999999999.0
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", 0) == 100.0


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_parse_retry_after_never_raises(value: str) -> None:
    result = parse_retry_after(value, 1.7e9)
    assert result is None or result >= 0


def test_the_window_doubles_to_its_cap_and_is_0_before_a_failure() -> None:
    policy = Backoff(base=0.5, cap=4.0)
    assert [policy.ceiling(n) for n in range(7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert Backoff().ceiling(10_000) == 60.0  # no overflow however many failures


def test_full_jitter_with_a_floor_and_retry_after_as_a_minimum() -> None:
    policy = Backoff(base=1.0, cap=60.0, floor=0.25)
    assert policy.delay(3, lambda: 0.5) == 2.0  # half of the 4 s window
    assert policy.delay(3, lambda: 0.0) == 0.25  # never a hot loop
    assert policy.delay(3, lambda: 0.5, retry_after=10.0) == 10.0  # the server's wait wins
    assert policy.delay(3, lambda: 0.99, retry_after=1.0) == pytest.approx(3.96)
    assert policy.delay(1, lambda: 0.5, retry_after=math.inf) == 0.5  # not a number of seconds
    assert policy.delay(1, lambda: 0.5, retry_after=math.nan) == 0.5


def test_the_pacer_spaces_calls_by_failure_and_a_success_frees_them() -> None:
    clock = FakeClock()
    draws = iter([1.0 - 1e-9, 0.5, 0.5])
    pacer = Pacer(Backoff(base=1.0, cap=30.0), clock, rand=lambda: next(draws))
    assert pacer.wait() == 0 and pacer.failures == 0
    assert pacer.failed() == pytest.approx(1.0)
    assert pacer.wait() == pytest.approx(1.0)
    clock.advance(0.4)
    assert pacer.wait() == pytest.approx(0.6)
    assert pacer.failed() == 1.0  # second failure: half of a 2 s window, from now
    assert pacer.failures == 2
    assert pacer.failed(retry_after=7.0) == 7.0
    assert pacer.wait() == 7.0
    pacer.succeeded()
    assert pacer.wait() == 0 and pacer.failures == 0


def test_a_reset_allows_a_call_at_once() -> None:
    pacer = Pacer(Backoff(), FakeClock(), rand=lambda: 0.9)
    for _ in range(5):
        pacer.failed()
    assert pacer.wait() > 10
    pacer.reset()
    assert pacer.wait() == 0 and pacer.failures == 0


def test_a_date_in_the_past_means_now_and_a_zone_is_required() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT", now) == 0.0
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:00", now) is None  # no zone: not HTTP
    assert parse_retry_after(None, now) is None
    assert parse_retry_after(" 12 ", now) == 12.0
    assert parse_retry_after("-5", now) is None
