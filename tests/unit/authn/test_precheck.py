"""The unverified pre-check in front of every review: what cannot be a ServiceAccount token
for this audience costs the API server nothing."""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cp_token.authn.precheck import MAX_TOKEN_BYTES, b64url_bytes, precheck
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


@given(st.text(alphabet="abcXYZ019-_+/=. \n\x00é", max_size=12))
def test_b64url_accepts_exactly_unpadded_base64url(text: str) -> None:
    import base64
    import binascii
    import re

    valid = bool(re.fullmatch(r"[A-Za-z0-9_-]+", text))
    try:
        expected: bytes | None = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        expected = None
    try:
        got: bytes | None = b64url_bytes(text)
    except ValueError:
        got = None
    assert got == (expected if valid else None)


NOW = 1_800_000_000.0


AUD = ("ambient-cp",)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt_of(header: Any, claims: Any, sig: str = "c2ln") -> str:
    def enc(v: Any) -> str:
        return b64(v if isinstance(v, bytes) else json.dumps(v).encode())

    return f"{enc(header)}.{enc(claims)}.{sig}"


GOOD_CLAIMS = {"aud": ["ambient-cp"], "exp": NOW + 600, "sub": "system:serviceaccount:a:b"}


def deep(n: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * n + close * n).encode()


HOSTILE = [
    # nesting depth >= 1000 in header or payload (RecursionError before)
    b64(b'{"alg":"RS256","x":' + deep(1000) + b"}")
    + "."
    + b64(json.dumps(GOOD_CLAIMS).encode())
    + ".c2ln",
    b64(b'{"alg":"RS256"}') + "." + b64(b'{"a":' + deep(5000, '{"a":', "}") + b"}") + ".c2ln",
    # exp / nbf / iat of hundreds of digits (OverflowError in float() before)
    jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "exp": int("9" * 400)}),
    jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "nbf": -int("9" * 400)}),
    jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "iat": int("9" * 300)}),
    b64(b'{"alg":"RS256"}') + "." + b64(b'{"aud":"ambient-cp","exp":1e999}') + ".c2ln",
    b64(b'{"alg":"RS256"}') + "." + b64(b'{"aud":"ambient-cp","exp":NaN}') + ".c2ln",
    b64(b'{"alg":"RS256"}')
    + "."
    + b64(b'{"aud":"ambient-cp","exp":' + b"9" * 5000 + b"}")
    + ".c2ln",
    # wrong types
    jwt_of({"alg": ["RS256"]}, GOOD_CLAIMS),
    jwt_of({"alg": {"RS256": 1}}, GOOD_CLAIMS),
    jwt_of({"alg": "RS256", "kid": ["k"]}, GOOD_CLAIMS),
    jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "aud": {"ambient-cp": 1}}),
    jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "exp": "tomorrow"}),
    jwt_of({"alg": "RS256"}, {**GOOD_CLAIMS, "exp": True}),
    jwt_of({}, GOOD_CLAIMS),
    jwt_of({"alg": "RS256"}, [GOOD_CLAIMS]),
    # encodings json.loads would sniff, and bytes that are no text at all
    jwt_of({"alg": "RS256"}, json.dumps(GOOD_CLAIMS).encode("utf-16")),
    jwt_of({"alg": "RS256"}, b"\xff\xfe\x00"),
    b64(b'{"alg":"RS256"}') + "." + b64(json.dumps(GOOD_CLAIMS).encode()) + ".c2ln\n",
    "a" * (MAX_TOKEN_BYTES + 1),
    "",
    "...",
    "a.b",
]


@pytest.mark.parametrize("token", HOSTILE, ids=range(len(HOSTILE)))
def test_precheck_refuses_hostile_tokens_as_401(token: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        precheck(token, AUD, NOW)
    if len(token.split(".")) == 3 and token.endswith(".c2ln") and len(token) < MAX_TOKEN_BYTES:
        assert info.value.description != "malformed token: not a JWT"  # refused for its content
    assert info.value.status == 401
    assert not token or token[:40] not in info.value.description


def test_precheck_is_cheap_on_deep_nesting() -> None:
    """The nesting bound is checked before json.loads recurses: far below the stack limit."""
    token = b64(b'{"alg":"RS256"}') + "." + b64(deep(6000)) + ".c2ln"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # json.loads of 6000 levels would fail loudly under this
    try:
        with pytest.raises(Unauthenticated) as info:
            precheck(token, AUD, NOW)
    finally:
        sys.setrecursionlimit(limit)
    assert "nests too many values" in info.value.description


def test_precheck_time_claims() -> None:
    ok = precheck(jwt_of({"alg": "ES256"}, GOOD_CLAIMS), AUD, NOW)
    assert ok.exp == NOW + 600 and ok.alg == "ES256" and ok.subject == "system:serviceaccount:a:b"
    for claims, reason in [
        ({**GOOD_CLAIMS, "exp": NOW - 100}, "expired"),
        ({**GOOD_CLAIMS, "nbf": NOW + 3600}, "not_yet_valid"),
        ({**GOOD_CLAIMS, "iat": NOW + 3600}, "not_yet_valid"),
        ({**GOOD_CLAIMS, "aud": "kube"}, "wrong_audience"),
    ]:
        with pytest.raises(Unauthenticated) as info:
            precheck(jwt_of({"alg": "RS256"}, claims), AUD, NOW)
        assert info.value.reason == reason


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


CLAIM_NAMES = st.sampled_from(["alg", "kid", "aud", "exp", "nbf", "iat", "sub", "iss", "typ"])


OBJECTS = st.dictionaries(CLAIM_NAMES | st.text(max_size=6), JSON, max_size=8)


@settings(max_examples=400, deadline=None)
@given(
    header=OBJECTS | JSON,
    claims=OBJECTS | JSON,
    sig=st.text(alphabet="abcXYZ019-_=+/.", max_size=30),
    depth=st.integers(min_value=0, max_value=3000),
)
def test_precheck_property_only_401(header: Any, claims: Any, sig: str, depth: int) -> None:
    if depth > 50:
        claims = {"aud": "ambient-cp", "x": json.loads("[" * 40 + "]" * 40), "d": depth}
    token = jwt_of(header, claims, sig or "s")
    try:
        jwt = precheck(token, AUD, NOW)
    except Unauthenticated as exc:
        assert exc.status == 401
        return
    assert isinstance(jwt.alg, str)
    assert jwt.exp is None or isinstance(jwt.exp, float)
