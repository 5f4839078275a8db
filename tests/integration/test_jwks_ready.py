"""``jwks`` authn answering at once: when the issuer keys, the issuer and the token's
ServiceAccount and pod reads are all at hand, a cold review awaits nothing. It must give
exactly the full review's answer, identity or refusal, for every kind of token."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from cp_token.authn.cache import CachedAuthenticator
from cp_token.authn.jwks import JwksReviewer
from cp_token.authn.precheck import decode_unverified
from cp_token.errors import Unauthenticated
from cp_token.identity import Identity
from tests.fakes.fixtures import SESSION_NS, SESSION_POD, SESSION_SA
from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.integration.cp_rig import JwksCP, claims_of, good

Outcome = Identity | tuple[str, str] | None


@pytest.fixture
async def cp(kubeconfig: Path, kube_apiserver: FakeKubeAPIServer) -> AsyncIterator[JwksCP]:
    c = JwksCP(kubeconfig)
    assert (await c.get(good(kube_apiserver))).status_code == 200  # keys, issuer, SA, pod read
    yield c
    await c.aclose()


def reviewer_of(cp: JwksCP) -> JwksReviewer:
    auth = cp.service.authenticator
    assert isinstance(auth, CachedAuthenticator)
    reviewer = auth._reviewer
    assert isinstance(reviewer, JwksReviewer)
    return reviewer


def ready(reviewer: JwksReviewer, token: str) -> Outcome:
    try:
        return reviewer.review_ready(token, decode_unverified(token))
    except Unauthenticated as exc:
        return exc.description, exc.reason


async def full(reviewer: JwksReviewer, token: str) -> Outcome:
    try:
        return await reviewer.review_decoded(token, decode_unverified(token))
    except Unauthenticated as exc:
        return exc.description, exc.reason


def changed(k: FakeKubeAPIServer, **change: Any) -> str:
    return k.sign_claims({**claims_of(good(k)), **change})


def with_k8s(k: FakeKubeAPIServer, part: str, value: Any) -> str:
    claims = claims_of(good(k))
    claims["kubernetes.io"] = {**claims["kubernetes.io"], part: value}
    return k.sign_claims(claims)


def forged(k: FakeKubeAPIServer) -> str:
    other = FakeKubeAPIServer()  # never started: only its key is used
    return other.sign_claims(claims_of(good(k)), header={"kid": k.signing_kid})


TOKENS: dict[str, Callable[[FakeKubeAPIServer], str]] = {
    "another token of the same pod": good,
    "forged signature": forged,
    "wrong issuer": lambda k: changed(k, iss="https://elsewhere.example"),
    "wrong audience": lambda k: changed(k, aud=["someone-else"]),
    "expired": lambda k: changed(k, exp=int(time.time()) - 3600),
    "not yet valid": lambda k: changed(k, nbf=int(time.time()) + 3600),
    "no expiry": lambda k: changed(k, exp=None),
    "subject of another SA": lambda k: changed(k, sub="system:serviceaccount:x:y"),
    "ServiceAccount recreated": lambda k: with_k8s(
        k, "serviceaccount", {**claims_of(good(k))["kubernetes.io"]["serviceaccount"], "uid": "u"}
    ),
    "pod recreated": lambda k: with_k8s(
        k, "pod", {**claims_of(good(k))["kubernetes.io"]["pod"], "uid": "other-uid"}
    ),
}


@pytest.mark.parametrize("kind", list(TOKENS))
async def test_an_answer_at_once_is_the_full_reviews_answer(
    kube_apiserver: FakeKubeAPIServer, cp: JwksCP, kind: str
) -> None:
    reviewer = reviewer_of(cp)
    token = TOKENS[kind](kube_apiserver)
    calls = kube_apiserver.calls()
    at_once = ready(reviewer, token)
    assert at_once is not None  # everything it rests on was at hand
    assert kube_apiserver.calls() == calls  # and nothing was asked of the API server
    assert at_once == await full(reviewer, token)
    if kind == "another token of the same pod":
        assert isinstance(at_once, Identity)
    else:
        assert isinstance(at_once, tuple)


@pytest.mark.parametrize(
    "kind",
    ["pod claim not an object", "no ServiceAccount claim", "pod never read", "unknown kid"],
)
async def test_what_is_not_at_hand_or_malformed_goes_to_the_full_review(
    kube_apiserver: FakeKubeAPIServer, cp: JwksCP, kind: str
) -> None:
    reviewer = reviewer_of(cp)
    if kind == "pod claim not an object":
        token = with_k8s(kube_apiserver, "pod", "runner")
    elif kind == "no ServiceAccount claim":
        token = with_k8s(kube_apiserver, "serviceaccount", None)
    elif kind == "pod never read":
        kube_apiserver.add_pod(SESSION_NS, "another-runner", SESSION_SA)
        token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod="another-runner")
    else:
        token = kube_apiserver.sign_claims(claims_of(good(kube_apiserver)), header={"kid": "new"})
    assert ready(reviewer, token) is None
    answer = await full(reviewer, token)
    if kind == "pod never read":
        assert isinstance(answer, Identity)
    else:
        assert isinstance(answer, tuple)


async def test_a_running_session_is_served_without_a_call_and_refusals_are_remembered(
    kube_apiserver: FakeKubeAPIServer, cp: JwksCP
) -> None:
    calls = kube_apiserver.calls()
    auth = cp.service.authenticator
    assert isinstance(auth, CachedAuthenticator)
    reviews = auth.reviews
    tokens = [good(kube_apiserver) for _ in range(20)]
    assert {(await cp.get(t)).status_code for t in tokens} == {200}
    assert auth.reviews == reviews + 20  # each a review of its own, none from the API server
    assert kube_apiserver.calls() == calls
    bad = forged(kube_apiserver)
    first = await cp.get(bad)
    assert first.status_code == 401
    assert "signature" in first.json()["error_description"]
    assert (await cp.get(bad)).status_code == 401
    assert auth.reviews == reviews + 21  # the replay came from the refusal cache
    later = good(kube_apiserver)
    kube_apiserver.delete_pod(SESSION_NS, SESSION_POD)
    cp.clock.advance(10.5)  # the pod's read is stale: the full review reads it again
    assert (await cp.get(later)).status_code == 401
    assert kube_apiserver.calls("pods") >= 1
