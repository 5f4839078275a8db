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
