"""The client's errors: one base a caller can catch, and the two outcomes it must tell apart
(refused: do not retry; unavailable: retry later), each carrying what the server said and
where, and nothing of a token."""

from __future__ import annotations

import pytest

from cp_token.client import TokenError, TokenRejected, TokenUnavailable


def test_one_base_catches_both_outcomes() -> None:
    assert issubclass(TokenRejected, TokenError) and issubclass(TokenUnavailable, TokenError)
    assert not issubclass(TokenRejected, TokenUnavailable)
    assert not issubclass(TokenUnavailable, TokenRejected)
    for error in (TokenRejected(403, "no", "u"), TokenUnavailable("down", "u")):
        with pytest.raises(TokenError):
            raise error


def test_a_refusal_says_who_refused_with_which_status_and_why() -> None:
    error = TokenRejected(403, "not a session runner", "https://cp/token")
    assert (error.status, error.description, error.url) == (
        403,
        "not a session runner",
        "https://cp/token",
    )
    assert str(error) == "https://cp/token refused the token request (403): not a session runner"


def test_unavailable_keeps_the_server_s_wait() -> None:
    error = TokenUnavailable("the CP answered 503", "https://cp/token", retry_after=7.0)
    assert (str(error), error.url, error.retry_after) == (
        "the CP answered 503",
        "https://cp/token",
        7.0,
    )
    assert TokenUnavailable("timed out", "https://cp/token").retry_after is None
