"""Every answer from upstream is untrusted input (SPEC "Hostile input and overload"): the
red team's malformed CP answers (issue 17), from a raw TCP server on 127.0.0.1, against the
client library (sync, async, direct and through a sidecar URL) and the sidecar's own HTTP
client. Each is a bad answer: a ``TokenError`` (``TokenUnavailable``, retried; a refusal
``TokenRejected``), never another exception, with a one-line message that quotes no token
and at most 300 characters of upstream text. The one reading of a token answer
(``parse_token_response``) and ``parse_retry_after`` are also fuzzed."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cp_token.client import TokenError, TokenRejected, TokenSource, TokenUnavailable
from cp_token.client._http import (
    MAX_DESCRIPTION,
    MAX_LIFETIME,
    RawAnswer,
    lifetime,
    parse_token_response,
    printable,
    token_problem,
)
from cp_token.runtime.backoff import parse_retry_after
from cp_token.runtime.clock import FakeClock
from sidecar.upstream import UpstreamSource
from tests.fakes.client import Script
from tests.fakes.hostile_upstream import HOSTILE_ANSWERS, SECRET, RawUpstream
from tests.fakes.sidecar_rig import Rig

CASES = sorted(HOSTILE_ANSWERS)
REFUSALS = {"error-text-60kb", "error-json-200000-deep"}  # 403s: TokenRejected, not retried
RETRY_AFTER_CASES = [c for c in CASES if c.startswith("retry-after-")]
# upstream text that may appear in a message, beyond the URL and our own words
MAX_MESSAGE = 2 * MAX_DESCRIPTION + 200


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    with RawUpstream() as server:
        yield server


@pytest.fixture
def sa_file(tmp_path: Path) -> Path:
    path = tmp_path / "sa"
    path.write_text("sa.jwt.token")
    return path


def check(exc: BaseException, case: str) -> None:
    """The error a bad answer must give."""
    assert isinstance(exc, TokenError), f"{case}: {type(exc).__name__} escaped"
    if case in REFUSALS:
        assert isinstance(exc, TokenRejected)
        assert len(exc.description) <= MAX_DESCRIPTION
    else:
        assert isinstance(exc, TokenUnavailable), f"{case}: {exc!r}"
    message = str(exc)
    assert SECRET not in message
    assert "\n" not in message and "\r" not in message and "\x00" not in message
    message.encode("utf-8")  # no lone surrogate
    assert len(message) <= MAX_MESSAGE, f"{case}: {len(message)} characters"


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
    check(info.value, case)
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
    check(info.value, case)


@pytest.mark.parametrize("case", CASES)
async def test_the_sidecars_http_client(case: str, upstream: RawUpstream, sa_file: Path) -> None:
    fetcher = UpstreamSource(
        cp_url=upstream.url(case), sa_token_file=str(sa_file), clock=FakeClock(), timeout=5
    )
    with pytest.raises(Exception) as info:
        await fetcher.afetch_once()
    check(info.value, case)
    if case in RETRY_AFTER_CASES:  # treated as absent: the backoff decides
        assert isinstance(info.value, TokenUnavailable) and info.value.retry_after is None


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


def answer(status: int, body: bytes = b"", **headers: str) -> RawAnswer:
    return RawAnswer(status, "Reason", {k.replace("_", "-"): v for k, v in headers.items()}, body)


def parse(raw: RawAnswer):  # type: ignore[no-untyped-def]
    return parse_token_response(raw, "http://cp/token", fetched_at=0.0, wall_now=1.7e9)


def test_lifetime_bounds() -> None:
    assert lifetime(None) is None
    assert lifetime(0) == 0 and lifetime(900) == 900 and lifetime(MAX_LIFETIME) == MAX_LIFETIME
    for bad in (MAX_LIFETIME + 1, -1, 1e308, 900.0, True, "900", 10**400):
        with pytest.raises(ValueError):
            lifetime(bad)


def test_token_characters() -> None:
    assert token_problem("eyJ.a-b_c~+/=") is None
    for bad in ("", "a b", "a\nb", "a\x00b", "a\ud800", "é", "a" * 16385, None, 5):
        assert token_problem(bad) is not None
    assert SECRET not in (token_problem(f"{SECRET}\n") or "")


def test_relayed_text_is_cut_and_one_line() -> None:
    assert printable("x" * 1000) == "x" * MAX_DESCRIPTION
    assert printable("a\nb\x00c\ud800") == "a?b?c?"


def test_a_non_json_error_text_is_cut_to_300_characters() -> None:
    """Before: a refusal with a text body relayed the reason phrase whole (60 KB)."""
    raw = RawAnswer(403, "y" * 60_000, {}, b"z" * 60_000)
    with pytest.raises(TokenRejected) as info:
        parse(raw)
    assert info.value.description == "y" * MAX_DESCRIPTION
    raw = RawAnswer(502, "y" * 60_000, {"location": "x"}, b"not json")
    with pytest.raises(TokenUnavailable) as busy:
        parse(raw)
    assert len(str(busy.value)) < MAX_DESCRIPTION + 60


def test_a_redirect_location_is_cut() -> None:
    with pytest.raises(TokenError) as info:
        parse(answer(302, location="http://x/" + "a\n" * 30_000))
    assert len(str(info.value)) < MAX_DESCRIPTION + 200 and "\n" not in str(info.value)


def test_a_status_http_does_not_have_is_a_bad_answer() -> None:
    for status in (0, 99, 600, 999):
        with pytest.raises(TokenUnavailable, match="HTTP does not have"):
            parse(answer(status))


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


@settings(max_examples=300, deadline=None)
@given(
    status=st.integers(min_value=-5, max_value=1200),
    reason=st.text(max_size=50),
    headers=st.dictionaries(
        st.sampled_from(["retry-after", "location", "content-type"]), st.text(max_size=40)
    ),
    body=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
            max_leaves=20,
        ).map(lambda v: repr(v).encode()),
        st.fixed_dictionaries(
            {"token": st.text(max_size=30), "expires_in": st.integers() | st.floats()}
        ).map(lambda d: json.dumps(d).encode()),
    ),
)
def test_parse_token_response_raises_only_token_errors(
    status: int, reason: str, headers: dict[str, str], body: bytes
) -> None:
    try:
        token = parse(RawAnswer(status, reason, headers, body))
    except TokenError as exc:
        assert len(str(exc)) <= MAX_MESSAGE
        assert "\n" not in str(exc)
    else:
        assert token_problem(token.token) is None
        assert token.expires_in is None or 0 <= token.expires_in <= MAX_LIFETIME


# --- what the sidecar relays to its callers ---------------------------------------------------


async def test_the_sidecar_relays_at_most_300_characters_of_upstream_text(tmp_path: Path) -> None:
    """Before: a refusal's non-JSON text (here the 60 KB reason phrase) was relayed whole."""
    long = b"y" * 60_000
    refusal = httpx.Response(403, content=long, extensions={"reason_phrase": long})
    rig = Rig(Script(refusal), tmp_path)
    refused = await rig.get()
    assert refused.status_code == 403
    assert refused.json()["error_description"] == "y" * MAX_DESCRIPTION

    outage = httpx.Response(503, content=long, extensions={"reason_phrase": long})
    rig = Rig(Script(outage), tmp_path)
    busy = await rig.get()
    assert busy.status_code == 503
    assert len(busy.json()["error_description"]) < MAX_DESCRIPTION + 150
