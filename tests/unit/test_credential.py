"""The presented credential's outer shape: RFC 6750 bearer parsing."""

from __future__ import annotations

import pytest

from cp_token.credential import parse_bearer
from cp_token.errors import Unauthenticated


@pytest.mark.parametrize(
    ("header", "www_authenticate"),
    [
        (None, "Bearer"),
        ("Basic abc", "Bearer"),
        ("Bearer", 'Bearer error="invalid_token"'),
        ("Bearer   ", 'Bearer error="invalid_token"'),
        ("Bearer a b", 'Bearer error="invalid_token"'),
    ],
)
def test_bearer_refusals(header: str | None, www_authenticate: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        parse_bearer(header)
    assert info.value.status == 401
    assert info.value.headers()["WWW-Authenticate"] == www_authenticate


def test_bearer_scheme_is_case_insensitive() -> None:
    assert parse_bearer("bearer abc.def") == "abc.def"
    assert parse_bearer("BEARER  abc") == "abc"
