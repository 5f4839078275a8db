"""The CP service against the fake kube-apiserver, reached through a kubeconfig, in-process.

The acceptance cases run for both authenticators (TokenReview and local JWKS verification):
the policy, minters and status codes must not know which one ran. The CP and the ``authn`` and
``make_cp`` fixtures: tests/integration/cp_rig.py and conftest.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.fakes.fixtures import SESSION_NS, SESSION_POD, SESSION_SA
from tests.fakes.kube_apiserver import FakeKubeAPIServer


async def test_allowed_runner_gets_a_token(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    cp = make_cp(authn)
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    resp = await cp.get(token)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"] == "Bearer" and 890 <= body["expires_in"] <= 900
    assert token not in resp.text


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("wrong_audience", 401),
        ("expired", 401),
        ("garbage", 401),
        ("deleted_pod", 401),
        ("recreated_pod", 401),
        ("deleted_sa", 401),
        ("bad_signature", 401),
        ("legacy", 401),
        ("unbound", 403),
        ("not_session_sa", 403),
        ("sa_not_labelled", 403),
        ("ns_not_labelled", 403),
    ],
)
async def test_refusals(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str, case: str, status: int
) -> None:
    k = kube_apiserver
    token: str
    if case == "wrong_audience":
        token = k.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD, audiences=["other"])
    elif case == "expired":
        token = k.issue_bound_token(
            SESSION_NS, SESSION_SA, pod=SESSION_POD, expiration_seconds=600, now=0
        )
    elif case == "garbage":
        token = "not-a-jwt"
    elif case == "deleted_pod":
        token = k.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
        k.delete_pod(SESSION_NS, SESSION_POD)
    elif case == "recreated_pod":
        token = k.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
        k.delete_pod(SESSION_NS, SESSION_POD)
        k.add_pod(SESSION_NS, SESSION_POD, SESSION_SA)
    elif case == "deleted_sa":
        token = k.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
        k.delete_service_account(SESSION_NS, SESSION_SA)
    elif case == "bad_signature":
        good = k.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
        head, payload, sig = good.split(".")
        token = f"{head}.{payload}.{sig[:-4]}AAAA"
    elif case == "legacy":
        token = k.issue_legacy_token(SESSION_NS, SESSION_SA)
    elif case == "unbound":
        token = k.issue_bound_token(SESSION_NS, SESSION_SA)
    elif case == "not_session_sa":
        k.add_service_account(SESSION_NS, "default", labels={})
        k.add_pod(SESSION_NS, "other-pod", "default")
        token = k.issue_bound_token(SESSION_NS, "default", pod="other-pod")
    elif case == "sa_not_labelled":
        k.set_service_account_labels(SESSION_NS, SESSION_SA, {})
        token = k.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    elif case == "ns_not_labelled":
        k.set_namespace_labels(SESSION_NS, {"ambient-code.io/managed": "false"})
        token = k.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    cp = make_cp(authn)
    resp = await cp.get(token)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == ("invalid_token" if status == 401 else "access_denied")
    if status == 401:
        assert resp.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert token not in resp.text


async def test_labelled_sa_in_unmanaged_namespace_is_refused(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    """Anyone with `edit` can create a labelled `session-x-sa`; only the namespace label counts."""
    k = kube_apiserver
    k.add_namespace("team-a", labels={})
    k.add_service_account(
        "team-a", "session-x-sa", labels={"ambient-code.io/managed-by": "ambient-control-plane"}
    )
    k.add_pod("team-a", "sneaky", "session-x-sa")
    token = k.issue_bound_token("team-a", "session-x-sa", pod="sneaky")
    resp = await make_cp(authn).get(token)
    assert resp.status_code == 403
    assert "namespace" in resp.json()["error_description"]


async def test_garbage_costs_the_api_server_nothing(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    cp = make_cp(authn)
    kube_apiserver.reset_counts()
    expired = kube_apiserver.issue_bound_token(
        SESSION_NS, SESSION_SA, pod=SESSION_POD, expiration_seconds=600, now=0
    )
    other_aud = kube_apiserver.issue_bound_token(
        SESSION_NS, SESSION_SA, pod=SESSION_POD, audiences=["kube"]
    )
    for token in ["x", "a.b.c", "e30.e30.", expired, other_aud, "e30.eyJhdWQiOjF9.c2ln"]:
        assert (await cp.get(token)).status_code == 401
    assert kube_apiserver.calls() == 0


async def test_review_cache_and_singleflight_count_calls(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    cp = make_cp(authn, CP_TOKEN_RATE_LIMIT="1000/s,1000")
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    kube_apiserver.set_latency(0.2, None)
    results = await asyncio.gather(*(cp.get(token) for _ in range(30)))
    assert {r.status_code for r in results} == {200}
    assert cp.service.authenticator.reviews == 1
    if authn == "tokenreview":
        assert kube_apiserver.calls("tokenreviews") == 1
    else:
        assert kube_apiserver.calls("jwks") == 1
        assert kube_apiserver.calls("pods") == 1
    assert kube_apiserver.calls("namespaces") == 1
    assert kube_apiserver.calls("serviceaccounts") == 1
    # warm: no more API calls at all
    kube_apiserver.reset_counts()
    kube_apiserver.set_latency(0, None)
    for _ in range(10):
        assert (await cp.get(token)).status_code == 200
    assert kube_apiserver.calls() == 0


@pytest.mark.parametrize("mode", ["500", "reset", "hang"])
async def test_api_outage_is_503_with_retry_after(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str, mode: str, monkeypatch: Any
) -> None:
    cp = make_cp(authn)
    if mode == "hang":
        # keep the test quick: a 10 s timeout is the production value
        cp.service.kube.timeout = 0.5  # type: ignore[union-attr]
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    kube_apiserver.fail(None, mode)
    resp = await cp.get(token)
    kube_apiserver.fail(None, None)
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"] == "temporarily_unavailable"
    assert int(resp.headers["retry-after"]) >= 1
    # the outage is not remembered as a refusal: once it is over, the next request succeeds
    cp.clock.advance(2)
    assert (await cp.get(token)).status_code == 200


async def test_cached_answer_serves_through_an_outage(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    cp = make_cp(authn)
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(token)).status_code == 200
    kube_apiserver.fail(None, "500")
    assert (await cp.get(token)).status_code == 200


async def test_cp_rbac_refusal_is_503(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, caplog: pytest.LogCaptureFixture
) -> None:
    kube_apiserver.deny("create", "authentication.k8s.io", "tokenreviews")
    cp = make_cp("tokenreview")
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    resp = await cp.get(token)
    assert resp.status_code == 503
    assert "CP_TOKEN_AUTHN=jwks" in caplog.text
    assert "tokenreviews" in caplog.text
    # the same cluster works with jwks authn, which needs no cluster-scoped permission
    assert (await make_cp("jwks").get(token)).status_code == 200


async def test_startup_check_names_the_way_out(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, caplog: pytest.LogCaptureFixture
) -> None:
    kube_apiserver.deny("create", "authentication.k8s.io", "tokenreviews")
    cp = make_cp("tokenreview")
    await cp.service.startup_checks()
    assert "may NOT create tokenreviews" in caplog.text
    assert "CP_TOKEN_AUTHN=jwks" in caplog.text


async def test_tokenreview_sends_audiences(kube_apiserver: FakeKubeAPIServer, make_cp: Any) -> None:
    cp = make_cp("tokenreview", CP_TOKEN_AUDIENCES="ambient-cp,extra-aud")
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(token)).status_code == 200
    body = kube_apiserver.requests("tokenreviews")[0].json
    assert body["spec"]["audiences"] == ["ambient-cp", "extra-aud"]


async def test_unbound_allowed_when_not_required(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    cp = make_cp(authn, CP_TOKEN_REQUIRE_BOUND="false")
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA)
    assert (await cp.get(token)).status_code == 200


async def test_label_checks_can_be_disabled(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    kube_apiserver.set_service_account_labels(SESSION_NS, SESSION_SA, {})
    kube_apiserver.set_namespace_labels(SESSION_NS, {})
    cp = make_cp(authn, CP_TOKEN_MANAGED_LABEL="", CP_TOKEN_NAMESPACE_LABEL="")
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(token)).status_code == 200
