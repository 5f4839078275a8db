"""Errors to HTTP in one place: the ``Retry-After`` handed to callers is spread over N to 2N
whole seconds (a fixed ``Retry-After: 5`` brought 300 pods back in the same second, every
5 s), with the random source injected."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from cp_token.errors import (
    Forbidden,
    InternalError,
    RateLimited,
    Unavailable,
    error_response,
    exchange_error_response,
    spread_retry_after,
)


def test_the_spread_covers_n_to_2n_whole_seconds() -> None:
    assert spread_retry_after(5, lambda: 0.0) == 5
    assert spread_retry_after(5, lambda: 0.999999) == 10
    assert spread_retry_after(5, lambda: 0.5) == 8
    assert spread_retry_after(0, lambda: 0.999999) == 2  # at least 1, so 1 to 2
    assert {spread_retry_after(1, r) for r in (lambda: 0.0, lambda: 0.7)} == {1, 2}


def test_300_pods_told_to_come_back_in_5_s_spread_over_6_seconds() -> None:
    rng = random.Random(7)
    waits = Counter(spread_retry_after(5, rng.random) for _ in range(300))
    assert set(waits) == {5, 6, 7, 8, 9, 10}
    assert max(waits.values()) <= 80  # about 50 a second, not 300


@pytest.mark.parametrize("render", [error_response, exchange_error_response])
@pytest.mark.parametrize(
    ("error", "wait"),
    [
        (Unavailable("the Kubernetes API is unavailable", retry_after=5), 5),
        (InternalError(), 5),
        (RateLimited("too many token requests", retry_after=0.2), 1),
        (Unavailable("no signing key", retry_after=30), 30),
    ],
)
def test_both_doors_spread_retry_after(render: object, error: Unavailable, wait: int) -> None:
    low = render(error, rand=lambda: 0.0)  # type: ignore[operator]
    high = render(error, rand=lambda: 0.999999)  # type: ignore[operator]
    assert low.headers["retry-after"] == str(wait)
    assert high.headers["retry-after"] == str(2 * wait)
    assert low.headers["cache-control"] == "no-store"
    assert error.headers()["Retry-After"] == str(wait)  # the error keeps the wait itself


def test_no_retry_after_where_there_is_no_wait() -> None:
    for render in (error_response, exchange_error_response):
        assert "retry-after" not in render(Forbidden("not an allowed runner")).headers
