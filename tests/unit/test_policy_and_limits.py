"""Policy rules, bearer parsing, the unverified precheck and the rate limiter."""

from __future__ import annotations

import base64
import json

import pytest

from cp_token.app import parse_bearer, rfc3339
from cp_token.authn.precheck import precheck
from cp_token.errors import Forbidden, RateLimited, Unauthenticated
from cp_token.identity import POD_NAME_KEY, POD_UID_KEY, Identity
from cp_token.policy import RunnerPolicy
from cp_token.ratelimit import RateLimiter
from cp_token.runtime.clock import FakeClock

BOUND = {POD_NAME_KEY: ("runner",), POD_UID_KEY: ("uid-1",)}
MANAGED = ("ambient-code.io/managed-by", "ambient-control-plane")
NS_MANAGED = ("ambient-code.io/managed", "true")


def ident(username: str, bound: bool = True) -> Identity:
    return Identity(username=username, extra=BOUND if bound else {})


def test_identity_parts() -> None:
    i = ident("system:serviceaccount:ns1:session-42-sa")
    assert (i.namespace, i.service_account, i.pod_name, i.pod_uid) == (
        "ns1",
        "session-42-sa",
        "runner",
        "uid-1",
    )
    assert i.pod_bound
    assert ident("alice").namespace is None
    assert ident("system:serviceaccount:a:b:c").namespace is None


@pytest.mark.parametrize(
    ("username", "bound", "reason"),
    [
        ("alice", True, "not_service_account"),
        ("system:serviceaccount:ns:default", True, "sa_not_allowed"),
        ("system:serviceaccount:session-1:session-x-sa", False, "not_pod_bound"),
        ("system:serviceaccount:kube-system:session-x-sa", True, "namespace_not_allowed"),
    ],
)
def test_identity_rules(username: str, bound: bool, reason: str) -> None:
    policy = RunnerPolicy(allowed_namespaces=("session-*", "team-*"))
    with pytest.raises(Forbidden) as info:
        policy.check_identity(ident(username, bound))
    assert info.value.reason == reason


def test_allowed_runner_passes_and_bound_can_be_disabled() -> None:
    RunnerPolicy().check_identity(ident("system:serviceaccount:ns:session-x-sa"))
    RunnerPolicy(require_bound=False).check_identity(
        ident("system:serviceaccount:ns:session-x-sa", bound=False)
    )


def test_label_rules() -> None:
    policy = RunnerPolicy(managed_label=MANAGED, namespace_label=NS_MANAGED)
    i = ident("system:serviceaccount:ns:session-x-sa")
    good_ns = {"ambient-code.io/managed": "true"}
    good_sa = {"ambient-code.io/managed-by": "ambient-control-plane"}
    policy.check_labels(i, good_ns, good_sa)
    for ns_labels, sa_labels, reason in [
        (None, good_sa, "namespace_not_managed"),
        ({}, good_sa, "namespace_not_managed"),
        ({"ambient-code.io/managed": "false"}, good_sa, "namespace_not_managed"),
        (good_ns, None, "sa_not_managed"),
        (good_ns, {"ambient-code.io/managed-by": "someone-else"}, "sa_not_managed"),
    ]:
        with pytest.raises(Forbidden) as info:
            policy.check_labels(i, ns_labels, sa_labels)
        assert info.value.reason == reason


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


def test_rfc3339() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(1775345580.9) == "2026-04-04T23:33:00Z"
