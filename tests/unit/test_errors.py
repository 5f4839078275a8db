"""Errors to HTTP in one place: each type's status, code and headers at both doors (the
exchange answers a bad subject token 400, never 401 with a challenge), and the
``Retry-After`` handed to callers spread over N to 2N whole seconds (a fixed
``Retry-After: 5`` brought 300 pods back in the same second, every 5 s), with the random
source injected."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from cp_token.errors import (
    CPTokenError,
    Forbidden,
    InternalError,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    MethodNotAllowed,
    PayloadTooLarge,
    RateLimited,
    Unauthenticated,
    Unavailable,
    UnsupportedGrantType,
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


# --- the one mapping from type to HTTP ------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "code", "headers"),
    [
        (
            Unauthenticated("no Bearer credentials", missing=True),
            401,
            "invalid_token",
            {"www-authenticate": "Bearer"},
        ),
        (
            Unauthenticated("token expired", reason="expired"),
            401,
            "invalid_token",
            {"www-authenticate": 'Bearer error="invalid_token"'},
        ),
        (Forbidden("not a session runner"), 403, "access_denied", {}),
        (MethodNotAllowed("use GET", allow="GET"), 405, "method_not_allowed", {"allow": "GET"}),
        (
            PayloadTooLarge("the body exceeds 65536 bytes"),
            413,
            "invalid_request",
            {"connection": "close"},
        ),
        (RateLimited("slow down", retry_after=3), 429, "rate_limited", {"retry-after": "3"}),
        (Unavailable("down", retry_after=5), 503, "temporarily_unavailable", {"retry-after": "5"}),
        (InternalError(), 503, "temporarily_unavailable", {"retry-after": "5"}),
        (InvalidRequest("missing subject_token"), 400, "invalid_request", {}),
    ],
)
def test_get_token_maps_each_type_to_its_status_code_and_headers(
    error: CPTokenError, status: int, code: str, headers: dict[str, str]
) -> None:
    response = error_response(error, rand=lambda: 0.0)
    assert response.status_code == status
    assert json.loads(response.body) == {"error": code, "error_description": error.description}
    assert response.headers["cache-control"] == "no-store" and "pragma" not in response.headers
    for name, value in headers.items():
        assert response.headers[name] == value
    if "www-authenticate" not in headers:
        assert "www-authenticate" not in response.headers


@pytest.mark.parametrize(
    ("error", "verdict"),
    [
        (Unauthenticated("token expired", reason="expired"), "not authenticated"),
        (Unauthenticated("no token", missing=True), "not authenticated"),
        (Forbidden("not a session runner"), "not allowed"),
    ],
)
def test_the_exchange_answers_a_bad_subject_token_400_without_a_challenge(
    error: CPTokenError, verdict: str
) -> None:
    response = exchange_error_response(error)
    assert response.status_code == 400
    body = json.loads(response.body)
    assert body == {
        "error": "invalid_request",
        "error_description": f"subject_token {verdict}: {error.description}",
    }
    assert "www-authenticate" not in response.headers
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"  # RFC 6749 §5.1


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InvalidTarget("audience mcp is not allowed"), 400, "invalid_target"),
        (InvalidScope("scope admin is not allowed"), 400, "invalid_scope"),
        (UnsupportedGrantType("grant_type password"), 400, "unsupported_grant_type"),
        (MethodNotAllowed("use POST", allow="POST"), 405, "method_not_allowed"),
        (RateLimited("slow down", retry_after=1), 429, "rate_limited"),
    ],
)
def test_the_exchange_keeps_the_other_statuses(error: CPTokenError, status: int, code: str) -> None:
    response = exchange_error_response(error, rand=lambda: 0.0)
    assert response.status_code == status and json.loads(response.body)["error"] == code
    if isinstance(error, MethodNotAllowed):
        assert response.headers["allow"] == "POST"


def test_an_internal_error_is_retryable_for_the_caller_and_internal_for_the_operator() -> None:
    error = InternalError()
    assert isinstance(error, Unavailable) and error.status == 503
    assert (error.outcome, error.reason) == ("internal", "internal")
    down = Unavailable("the Kubernetes API is unavailable", reason="kube_unavailable")
    assert (down.outcome, down.reason) == ("temporarily_unavailable", "kube_unavailable")
    assert Forbidden("x").reason == "access_denied"  # the code when no reason is given
