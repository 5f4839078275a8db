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
