"""Authentication under hostile input, in-process against the fake kube-apiserver.

The real app (routes, authenticator, policy, jwt minter) with each authenticator (static,
tokenreview, jwks) behind it; the fake speaks real TokenReview JSON over HTTPS with real
signed ServiceAccount JWTs and counts every call, so "costs the API server nothing" is a
number. Fake clock for every expiry; real time only where a bound on waiting is asserted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cp_token.authn.cache import CachedAuthenticator
from cp_token.runtime.clock import FakeClock
from cp_token.settings.cp import load_settings
from cp_token.wiring import build_service
from tests.fakes.fixtures import (
    MANAGED_BY_LABEL,
    SESSION_NS,
    SESSION_POD,
    SESSION_SA,
    new_sessions,
)
from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.integration.cp_rig import CP, b64, claims_of, settings_env
from tests.integration.procs import write_identities


def forge(token: str, **changes: Any) -> str:
    """The token's header and (changed) claims with a signature no key made."""
    head, _, _ = token.split(".")
    claims = {**claims_of(token), **changes}
    return f"{head}.{b64(json.dumps(claims).encode())}.{b64(b'forged' * 43)}"


@pytest.fixture
async def make_cp(kubeconfig: Path, tmp_path: Path) -> AsyncIterator[Any]:
    made: list[CP] = []

    def make(authn: str, **extra: str) -> CP:
        clock = FakeClock(start=time.time())
        env = settings_env(kubeconfig, authn, CP_TOKEN_RATE_LIMIT="100000/s,100000", **extra)
        if authn == "static":
            ids = write_identities(
                tmp_path / "ids.json", "static-dev-token", f"system:serviceaccount:ns:{SESSION_SA}"
            )
            env = {k: v for k, v in env.items() if k != "KUBECONFIG"}
            env["CP_TOKEN_STATIC_IDENTITIES_FILE"] = str(ids)
        cp = CP(build_service(load_settings(env), clock), clock)
        made.append(cp)
        return cp

    yield make
    for cp in made:
        await cp.aclose()


@pytest.fixture
def one_cp(make_cp: Any) -> Any:
    """One CP per authenticator for the whole test (hypothesis runs many examples on it)."""
    made: dict[str, CP] = {}

    def get(authn: str) -> CP:
        return made.get(authn) or made.setdefault(authn, make_cp(authn))

    return get


# --- never a 5xx other than 503, whatever the bearer token ------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
CLAIMS = ["iss", "aud", "exp", "nbf", "iat", "sub", "jti", "kubernetes.io"]
K8S_PARTS = ["namespace", "serviceaccount", "pod", "node"]
SEG = st.text(alphabet="abcdefXYZ0189-_", min_size=1, max_size=40)


@st.composite
def hostile_tokens(draw: st.DrawFn, kube: FakeKubeAPIServer, good_claims: dict[str, Any]) -> str:
    """Opaque strings, JWTs of arbitrary structure, and JWTs with hostile claims that carry
    a REAL signature (so they get past the signature checks to every later check)."""
    kind = draw(st.sampled_from(["opaque", "structure", "signed", "deep", "large"]))
    if kind == "opaque":
        return draw(st.lists(SEG, min_size=1, max_size=4).map(".".join))
    if kind == "deep":
        depth = draw(st.integers(min_value=60, max_value=5000))
        nested = ("[" * depth + "]" * depth).encode()
        where = draw(st.booleans())
        head = b'{"alg":"RS256","x":' + nested + b"}" if where else b'{"alg":"RS256"}'
        body = b'{"aud":"ambient-cp","x":' + nested + b"}" if not where else b"{}"
        return f"{b64(head)}.{b64(body)}.c2ln"
    if kind == "large":
        size = draw(st.integers(min_value=15_000, max_value=17_000))
        claims = {**good_claims, "pad": "x" * (size * 3 // 4)}
        return forge(kube.sign_claims(good_claims), **claims)
    claims = dict(good_claims)
    for name in draw(st.lists(st.sampled_from(CLAIMS), max_size=3)):
        claims[name] = draw(JSON)
    if isinstance(claims.get("kubernetes.io"), dict) and draw(st.booleans()):
        claims["kubernetes.io"] = {
            **claims["kubernetes.io"],
            draw(st.sampled_from(K8S_PARTS)): draw(JSON),
        }
    if kind == "signed":
        return kube.sign_claims(claims)
    header = {"alg": draw(st.sampled_from(["RS256", "ES256", "none", "HS256"]) | JSON)}
    if draw(st.booleans()):
        header["kid"] = draw(st.just(kube.signing_kid) | JSON)
    body = json.dumps(claims).encode()
    return f"{b64(json.dumps(header).encode())}.{b64(body)}.{draw(SEG)}"


@pytest.mark.parametrize("authn", ["static", "tokenreview", "jwks"])
@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_any_bearer_token_is_never_a_5xx_other_than_503(
    kube_apiserver: FakeKubeAPIServer, one_cp: Any, authn: str, data: st.DataObject
) -> None:
    cp = one_cp(authn)
    good = claims_of(kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD))
    token = data.draw(hostile_tokens(kube_apiserver, good))
    resp = await cp.get(token)
    assert resp.status_code < 500 or resp.status_code == 503, (resp.status_code, resp.text)
    assert resp.headers["cache-control"] == "no-store"
    if resp.status_code == 401:
        assert resp.json()["error"] == "invalid_token"
    assert len(token) < 16 or token[:16] not in resp.text


# --- forged tokens cost the API server nothing ------------------------------------------------


async def test_forged_signature_flood_costs_no_token_review(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any
) -> None:
    cp = make_cp("tokenreview")
    good = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(good)).status_code == 200  # keys loaded by a real request
    kube_apiserver.reset_counts()
    forged = [forge(good, jti=f"forged-{i}") for i in range(400)]  # the real kid
    results = await asyncio.gather(*(cp.get(t) for t in forged))
    assert {r.status_code for r in results} == {401}
    assert {r.json()["error_description"] for r in results} == {
        "token signature does not verify against the cluster's issuer keys"
    }
    assert kube_apiserver.calls("tokenreviews") == 0
    assert kube_apiserver.calls("jwks") == 0  # known kid: no re-fetch either


async def test_unknown_kid_flood_refetches_once_then_costs_nothing(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any
) -> None:
    cp = make_cp("tokenreview")
    claims = claims_of(kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD))
    forged = [
        kube_apiserver.sign_claims({**claims, "jti": str(i)}, header={"kid": f"forged-{i}"})
        for i in range(100)
    ]
    results = await asyncio.gather(*(cp.get(t) for t in forged))
    assert {r.status_code for r in results} == {401}
    assert kube_apiserver.calls("tokenreviews") == 0
    assert kube_apiserver.calls("jwks") == 1  # the first load; unknown kids: within the window


async def test_key_rotation_reaches_token_review(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any
) -> None:
    cp = make_cp("tokenreview")
    assert (
        await cp.get(kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD))
    ).status_code == 200
    kube_apiserver.rotate_signing_key("ES256")
    cp.clock.advance(11)  # past the re-fetch window
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(token)).status_code == 200
    assert kube_apiserver.calls("jwks") == 2


async def test_unreadable_keys_leave_the_decision_to_token_review(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, caplog: pytest.LogCaptureFixture
) -> None:
    kube_apiserver.deny("get", "", "/openid/v1/jwks")
    cp = make_cp("tokenreview")
    good = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    with caplog.at_level(logging.INFO):
        assert (await cp.get(good)).status_code == 200
        forged = [forge(good, jti=f"f{i}") for i in range(5)]
        for token in forged:
            cp.clock.advance(2)  # past the retry interval: the keys are asked for again
            assert (await cp.get(token)).status_code == 401
    assert kube_apiserver.calls("tokenreviews") == 6  # TokenReview decided every one
    skipped = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(skipped) == 1  # said once, not per request
    assert "TokenReview decides" in skipped[0].getMessage()


async def test_a_key_set_this_service_cannot_use_is_not_a_reason_to_refuse(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any
) -> None:
    """An ES384 (P-384) signer would be unknown to RS256/ES256 verification: skip, not 401."""
    cp = make_cp("tokenreview")
    real = kube_apiserver.jwks

    def with_p384() -> dict[str, Any]:
        doc = real()
        doc["keys"] = [{**k, "kty": "EC", "crv": "P-384"} for k in doc["keys"]]
        return doc

    kube_apiserver.jwks = with_p384  # type: ignore[method-assign]
    good = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(good)).status_code == 200
    assert kube_apiserver.calls("tokenreviews") == 1


# --- the 12 s bound, scaled down: a hung API server is a prompt 503 ---------------------------


@pytest.mark.parametrize("authn", ["tokenreview", "jwks"])
async def test_hung_api_server_answers_503_within_slot_wait_plus_call_timeout(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    cp = make_cp(authn)
    kube = cp.service.kube
    assert kube is not None
    kube.timeout = 0.6  # production: 10 s; the structure of the bound is what is tested
    auth = cp.service.authenticator
    assert isinstance(auth, CachedAuthenticator)
    auth._queue_wait, auth.answer_within = 0.3, 0.3 + 0.6 - 0.06
    kube_apiserver.fail(None, "hang")
    try:
        pods = [f"new-{i}" for i in range(8)]
        tokens = []
        for pod in pods:
            kube_apiserver.add_pod(SESSION_NS, pod, SESSION_SA)
            tokens.append(kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=pod))
        start = time.monotonic()

        async def timed(token: str) -> tuple[int, float]:
            resp = await cp.get(token)
            return resp.status_code, time.monotonic() - start

        results = await asyncio.gather(*(timed(t) for t in tokens))
    finally:
        kube_apiserver.fail(None, None)
    assert {s for s, _ in results} == {503}
    assert max(t for _, t in results) < 0.3 + 0.6 + 0.3, results


async def test_a_slow_review_then_hung_label_reads_still_answer_503_within_the_bound(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any
) -> None:
    """The bound is the request's, not each call's: a review that takes most of it leaves the
    label reads only what is left (before: review time plus a whole call timeout)."""
    cp = make_cp("tokenreview")
    kube = cp.service.kube
    assert kube is not None
    kube.timeout = 0.6  # production: 10 s
    auth = cp.service.authenticator
    assert isinstance(auth, CachedAuthenticator)
    bound = 0.3 + 0.6 - 0.06
    auth._queue_wait, auth.answer_within = 0.3, bound
    cp.service.app.state.decision._answer_within = bound
    kube_apiserver.add_pod(SESSION_NS, "slow-then-hung", SESSION_SA)
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod="slow-then-hung")
    kube_apiserver.set_latency(0.55, "tokenreviews")  # within the call timeout
    kube_apiserver.fail("namespaces", "hang")
    kube_apiserver.fail("serviceaccounts", "hang")
    try:
        start = time.monotonic()
        resp = await cp.get(token)
        took = time.monotonic() - start
    finally:
        kube_apiserver.clear_faults()
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"] == "temporarily_unavailable"
    assert kube_apiserver.calls("tokenreviews") >= 1  # the review did answer
    assert took < bound + 0.2, took  # before: 0.55 + 0.6 and more


# --- revocation: a deleted pod's token stops within CP_TOKEN_LIVENESS_CACHE_TTL ---------------


async def test_caches_do_not_stack_after_a_pod_is_deleted(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any
) -> None:
    """Two tokens of one pod: the second is reviewed 9 s after the pod was read, from the
    cached read. Its review must not be reused past that read's own expiry."""
    cp = make_cp("jwks")
    first = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    second = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(first)).status_code == 200  # the pod is read now (t=0)
    kube_apiserver.delete_pod(SESSION_NS, SESSION_POD)  # deleted at t=0
    cp.clock.advance(9)
    assert (await cp.get(second)).status_code == 200  # allowed: the read is 9 s old
    cp.clock.advance(1.1)  # 10.1 s after the deletion
    assert (await cp.get(second)).status_code == 401
    assert (await cp.get(first)).status_code == 401


# --- the ServiceAccount pattern never admits an empty session id ------------------------------


@pytest.mark.parametrize("authn", ["tokenreview", "jwks"])
async def test_empty_session_id_is_refused(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    kube_apiserver.add_service_account(SESSION_NS, "session--sa", labels=MANAGED_BY_LABEL)
    kube_apiserver.add_pod(SESSION_NS, "empty-id", "session--sa")
    token = kube_apiserver.issue_bound_token(SESSION_NS, "session--sa", pod="empty-id")
    for cp in (make_cp(authn), make_cp(authn, CP_TOKEN_ALLOWED_SA="system:serviceaccount:*:*")):
        resp = await cp.get(token)
        assert resp.status_code == 403, resp.text
        assert resp.json()["error"] == "access_denied"


# --- the Kubernetes worker pool: as large as the slots; label reads never wait behind reviews --


async def test_kube_pool_is_as_large_as_the_slots(make_cp: Any) -> None:
    cp = make_cp("tokenreview", CP_TOKEN_MAX_REVIEWS="40")
    kube = cp.service.kube
    assert kube is not None
    # reviews (each a TokenReview, then a ServiceAccount and a pod read at once) + label
    # reads + shared calls
    assert kube.max_connections == 40 * 2 + 16 + 4
    connector = kube._client().connector
    assert connector is not None and connector.limit == kube.max_connections


async def test_label_reads_do_not_wait_behind_hung_reviews(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any
) -> None:
    cp = make_cp("tokenreview", CP_TOKEN_MAX_REVIEWS="10")
    assert cp.service.kube is not None
    cp.service.kube.timeout = 3.0
    first = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(first)).status_code == 200  # the namespace read at t=0
    cp.clock.advance(5)
    # another session of the namespace: its review rests on its own ServiceAccount and pod
    # reads (t=5, fresh until t=15); the namespace read is shared
    (known,) = new_sessions(kube_apiserver, 1, "k")
    assert (await cp.get(known)).status_code == 200
    cp.clock.advance(6)  # t=11: the namespace read (10 s) is stale, the review is not
    new = new_sessions(kube_apiserver, 10, "n")
    kube_apiserver.fail("tokenreviews", "hang")
    try:
        hung = [asyncio.create_task(cp.get(t)) for t in new]  # every review slot, hung
        await asyncio.sleep(0.3)
        start = time.monotonic()
        resp = await cp.get(known)  # needs a label read, on a thread of its own
        took = time.monotonic() - start
        assert resp.status_code == 200, resp.text
        assert took < 1.0, took
        assert not any(t.done() for t in hung)
    finally:
        kube_apiserver.fail(None, None)
    assert {r.status_code for r in await asyncio.gather(*hung)} <= {200, 503}


async def test_issuer_keys_are_reread_periodically(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any
) -> None:
    cp = make_cp("tokenreview")
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(token)).status_code == 200
    assert kube_apiserver.calls("jwks") == 1
    cp.clock.advance(301)  # past the 300 s max age: a background re-read, nobody waits
    other = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(other)).status_code == 200
    for _ in range(100):
        if kube_apiserver.calls("jwks") == 2:
            break
        await asyncio.sleep(0.02)
    assert kube_apiserver.calls("jwks") == 2
