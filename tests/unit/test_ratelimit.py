"""Per-identity token buckets on the injected clock."""

from __future__ import annotations

import pytest

from cp_token.errors import RateLimited
from cp_token.ratelimit import RateLimiter
from cp_token.runtime.clock import FakeClock


def test_rate_limiter_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(RateLimited) as info:
        limiter.check("a")
    assert info.value.headers()["Retry-After"] == "1"
    limiter.check("b")  # buckets are per identity
    clock.advance(0.5)
    limiter.check("a")  # one token refilled
    with pytest.raises(RateLimited):
        limiter.check("a")


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
