"""The CP against the fake kube-apiserver when the cluster does what real clusters do: keys
rotate, the API server goes away, answers 429. In-process, both authenticators, the fake
clock for every TTL and backoff; real time only where a bound on waiting is asserted."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.fakes.fixtures import SESSION_NS, SESSION_POD, SESSION_SA
from tests.fakes.kube_apiserver import FakeKubeAPIServer

# --- what the API server accepts, the CP accepts ------------------------------------------------


async def test_a_token_45_s_past_exp_is_accepted_as_the_api_server_does(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    """kube-apiserver validates with go-jose's 1-minute leeway (before: the precheck refused
    anything 30 s past exp, in both modes)."""
    cp = make_cp(authn)
    late = kube_apiserver.issue_bound_token(
        SESSION_NS, SESSION_SA, pod=SESSION_POD, expiration_seconds=600, now=time.time() - 645
    )
    assert (await cp.get(late)).status_code == 200
    too_late = kube_apiserver.issue_bound_token(
        SESSION_NS, SESSION_SA, pod=SESSION_POD, expiration_seconds=600, now=time.time() - 665
    )
    assert (await cp.get(too_late)).status_code == 401


@pytest.mark.parametrize("alg", ["ES384", "ES512"])
async def test_every_key_type_the_api_server_signs_with_is_accepted(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str, alg: str
) -> None:
    kube_apiserver.rotate_signing_key(alg)
    cp = make_cp(authn)
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(token)).status_code == 200
    if authn == "tokenreview":  # the pre-check verified it: a forgery costs no review
        head, payload, _ = token.split(".")
        kube_apiserver.reset_counts()
        forged = f"{head}.{payload}.{'A' * (132 if alg == 'ES384' else 176)}"
        assert (await cp.get(forged)).status_code == 401
        assert kube_apiserver.calls("tokenreviews") == 0


# --- key rotation: a token of a key published a moment ago is served ----------------------------


async def test_a_token_of_a_key_published_a_moment_ago_is_served(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    """Before: the CP re-read the key set at most once per 10 s and remembered the refusal
    5 s, so a rotation within 10 s of its last read made new pods dark for 39-57 s."""
    cp = make_cp(authn)
    first = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(first)).status_code == 200  # the key set is read now
    kube_apiserver.rotate_signing_key("ES256")
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    started = time.monotonic()
    resp = await cp.get(token)
    assert resp.status_code == 200, resp.text
    assert time.monotonic() - started < 2.0
    assert kube_apiserver.calls("jwks") == 2  # one re-read, at once


async def test_a_key_not_yet_published_is_refused_and_the_refusal_is_not_remembered(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    cp = make_cp(authn)
    assert (
        await cp.get(kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD))
    ).status_code == 200
    kube_apiserver.rotate_signing_key("RS256", publish=False)
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    resp = await cp.get(token)
    assert resp.status_code == 401  # still unknown after a fresh read
    assert resp.json()["error_description"] == (
        "token was signed by a key the cluster does not publish"
    )
    kube_apiserver.publish_keys()
    cp.clock.advance(1)  # reads stay one a second
    resp = await cp.get(token)  # not answered from the failed-review cache
    assert resp.status_code == 200, resp.text


# --- the API server down: recently decided callers are served, calls are paced ------------------


def outage(kube: FakeKubeAPIServer, mode: str) -> None:
    if mode == "refused":
        kube.stop()  # the port stays bound, not listening: connections are refused
    else:
        kube.fail(None, mode, retry_after=1)


def heal(kube: FakeKubeAPIServer, mode: str) -> None:
    if mode == "refused":
        kube.start()
    else:
        kube.fail(None, None)


@pytest.mark.parametrize("mode", ["refused", "500", "429"])
async def test_callers_decided_within_the_review_ttl_ride_out_an_outage(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str, mode: str
) -> None:
    """Before: the label reads (and with jwks the pod and ServiceAccount reads) were not used
    past CP_TOKEN_LIVENESS_CACHE_TTL: the first 503 came 10 s into an outage although the
    review was still cached, and every request tried the API server."""
    cp = make_cp(authn, CP_TOKEN_RATE_LIMIT="1000/s,1000")
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(token)).status_code == 200  # decided at t=0
    kube_apiserver.reset_counts()
    outage(kube_apiserver, mode)
    statuses = []
    for _ in range(14):  # t = 2 .. 28 s, ten requests every 2 s
        cp.clock.advance(2)
        statuses += [(await cp.get(token)).status_code for _ in range(10)]
    assert set(statuses) == {200}, statuses
    # at most one call (the probe) per backoff wait, not one per request
    assert kube_apiserver.calls() <= 14, kube_apiserver.calls()
    cp.clock.advance(3)  # t = 31: the reads are older than CP_TOKEN_REVIEW_CACHE_TTL
    resp = await cp.get(token)
    assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1
    heal(kube_apiserver, mode)
    cp.clock.advance(5)  # the longest backoff wait
    assert (await cp.get(token)).status_code == 200


async def test_a_real_answer_wins_over_what_was_read_before(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    cp = make_cp(authn)
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(token)).status_code == 200
    kube_apiserver.fail(None, "500")
    cp.clock.advance(12)
    assert (await cp.get(token)).status_code == 200  # answered from the reads of t=0
    kube_apiserver.fail(None, None)
    kube_apiserver.set_namespace_labels(SESSION_NS, {})  # the namespace is no longer managed
    kube_apiserver.delete_pod(SESSION_NS, SESSION_POD)
    cp.clock.advance(5)
    # The first request after the wait may still be answered from the old reads while one
    # call (the probe) finds out that the API server is back; its answer then decides.
    statuses = [(await cp.get(token)).status_code]
    deadline = time.monotonic() + 10
    while statuses[-1] == 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # the probe is a real call to a real server
        statuses.append((await cp.get(token)).status_code)
    assert statuses[-1] in (401, 403), statuses
    assert cp.service.kube.down is False


async def test_while_the_backoff_holds_a_new_pod_gets_503_at_once(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    cp = make_cp(authn)
    assert (
        await cp.get(kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD))
    ).status_code == 200
    kube_apiserver.add_pod(SESSION_NS, "new-pod", SESSION_SA)
    new = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod="new-pod")
    kube_apiserver.fail(None, "hang")
    kube = cp.service.kube
    kube.timeout = 0.3  # production: 10 s
    try:
        assert (await cp.get(new)).status_code == 503  # the call timed out: the backoff starts
        kube_apiserver.reset_counts()
        started = time.monotonic()
        for _ in range(20):
            resp = await cp.get(new)
            assert resp.status_code == 503
            # the remaining wait (another helper may spread it over N..2N)
            assert 1 <= int(resp.headers["retry-after"]) <= 2 * (1 + kube.retry_wait())
        assert time.monotonic() - started < 1.0  # at once, not after the call timeout
        assert kube_apiserver.calls() == 0  # held back: nothing reached the API server
    finally:
        kube_apiserver.fail(None, None)


async def test_a_429_is_waited_out_exactly_as_its_retry_after_says(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    """Before: the 429 was one more failure, its Retry-After ignored (retries after 5 s)."""
    cp = make_cp(authn)
    assert (
        await cp.get(kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD))
    ).status_code == 200
    kube_apiserver.add_pod(SESSION_NS, "new-pod", SESSION_SA)
    new = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod="new-pod")
    kube_apiserver.fail(None, "429", retry_after=10)
    resp = await cp.get(new)
    assert resp.status_code == 503 and 10 <= int(resp.headers["retry-after"]) <= 20
    kube_apiserver.reset_counts()
    kube_apiserver.fail(None, None)  # the API server would answer now, but it said 10 s
    cp.clock.advance(6)
    resp = await cp.get(new)
    assert resp.status_code == 503 and 4 <= int(resp.headers["retry-after"]) <= 8
    assert kube_apiserver.calls() == 0
    cp.clock.advance(4)
    assert (await cp.get(new)).status_code == 200


async def test_while_the_api_server_is_down_a_recent_caller_does_not_wait_for_the_probe(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    """The probe after a backoff wait may hang for the call timeout: a caller the CP can
    serve from what it read does not wait for it (before: it waited, and past
    CP_TOKEN_REVIEW_CACHE_TTL got a 503 although it asked within it)."""
    cp = make_cp(authn)
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(token)).status_code == 200
    kube_apiserver.add_pod(SESSION_NS, "new-pod", SESSION_SA)
    new = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod="new-pod")
    kube = cp.service.kube
    kube.timeout = 3.0  # production: 10 s
    kube_apiserver.fail(None, "hang")
    try:
        assert (await cp.get(new)).status_code == 503  # timed out: the API server is down
        cp.clock.advance(12)  # past the reads' own TTL, and past the backoff wait
        assert kube.retry_wait() == 0
        kube_apiserver.reset_counts()
        started = time.monotonic()
        for _ in range(5):
            assert (await cp.get(token)).status_code == 200
        assert time.monotonic() - started < 2.0
        deadline = time.monotonic() + 5
        while kube_apiserver.calls() == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # the probe goes on in the background
        await asyncio.sleep(0.2)
        assert kube_apiserver.calls() == 1  # one probe, however many reads were due
    finally:
        kube_apiserver.fail(None, None)
