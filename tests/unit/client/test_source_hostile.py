"""Every answer from upstream is untrusted input (SPEC "Hostile input and overload"): the
red team's malformed CP answers (issue 17), from a raw TCP server on 127.0.0.1, against the
client library's ``TokenSource`` (sync, async, direct and through a sidecar URL). Each is a bad
answer: a ``TokenError`` (``TokenUnavailable``, retried; a refusal ``TokenRejected``), never
another exception, with a one-line message that quotes no token and at most 300 characters of
upstream text (tests/fakes/hostile_upstream.py, ``check_bad_answer``). The reading itself is
fuzzed in test_http.py, the sidecar's client in tests/unit/sidecar/test_upstream.py.

Named after cp_token/client/_source.py with a suffix while tests/unit/client/test_source.py
is being rewritten: fold these into it."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from cp_token.client import TokenSource, TokenUnavailable
from cp_token.runtime.clock import FakeClock
from tests.fakes.hostile_upstream import HOSTILE_ANSWERS, REFUSALS, RawUpstream, check_bad_answer

CASES = sorted(HOSTILE_ANSWERS)


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    with RawUpstream() as server:
        yield server


@pytest.fixture
def sa_file(tmp_path: Path) -> Path:
    path = tmp_path / "sa"
    path.write_text("sa.jwt.token")
    return path


@pytest.mark.parametrize("case", CASES)
def test_the_client_library_sync_direct(case: str, upstream: RawUpstream, sa_file: Path) -> None:
    clock = FakeClock()  # retries wait on it: instant
    source = TokenSource(
        cp_url=upstream.url(case),
        sa_token_file=str(sa_file),
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
    case: str, upstream: RawUpstream, sa_file: Path
) -> None:
    """Before: 1e308 was served as expiring in year 9999 and never refreshed; 400 digits
    overflowed the expiry arithmetic."""
    source = TokenSource(
        cp_url=upstream.url(case), sa_token_file=str(sa_file), clock=FakeClock(), timeout=5
    )
    with pytest.raises(TokenUnavailable, match="expires_in"):
        source.fetch_once()


# --- the shared reading, piece by piece ------------------------------------------------------


# --- what the sidecar relays to its callers ---------------------------------------------------
