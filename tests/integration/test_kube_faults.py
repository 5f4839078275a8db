"""The CP against the fake kube-apiserver when the cluster does what real clusters do: keys
rotate, the API server goes away, answers 429. In-process, both authenticators, the fake
clock for every TTL and backoff; real time only where a bound on waiting is asserted."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.fakes.fixtures import SESSION_NS, SESSION_POD, SESSION_SA
from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.integration.test_cp_kube import authn, make_cp

__all__ = ["authn", "make_cp"]  # fixtures, imported for pytest


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
