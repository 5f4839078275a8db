"""The retry primitives: Retry-After parsing and the backoff envelope."""

from __future__ import annotations

import email.utils
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
