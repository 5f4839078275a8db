"""The unverified pre-check in front of every review: what cannot be a ServiceAccount token
for this audience costs the API server nothing."""

from __future__ import annotations

import base64
import json

import pytest

from cp_token.authn.precheck import precheck
from cp_token.errors import Unauthenticated


def _jwt(claims: dict[str, object]) -> str:
    def enc(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{enc({'alg': 'RS256'})}.{enc(claims)}.c2ln"


def test_precheck() -> None:
    now = 1_800_000_000.0
    ok = _jwt({"aud": ["ambient-cp"], "exp": now + 60})
    assert precheck(ok, ("ambient-cp",), now).exp == now + 60
    legacy = _jwt({"iss": "kubernetes/serviceaccount"})
    assert precheck(legacy, ("ambient-cp",), now).audiences is None
    cases = {
        "not-a-jwt": "malformed",
        "a.b": "malformed",
        "!!.!!.!!": "malformed",
        _jwt({"aud": "other", "exp": now + 60}): "wrong_audience",
        _jwt({"aud": "ambient-cp", "exp": now - 3600}): "expired",
        _jwt({"aud": "ambient-cp", "exp": "soon"}): "malformed",
    }
    for token, reason in cases.items():
        with pytest.raises(Unauthenticated) as info:
            precheck(token, ("ambient-cp",), now)
        assert info.value.reason == reason
        assert token not in info.value.description
