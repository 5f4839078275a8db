"""The token exchange against the fake kube-apiserver, for both authenticators, in-process.

The CP is built by ``build_service`` from settings exactly as ``cp-token serve`` builds it;
test_cp_kube.py's ``make_cp`` fixture (tests/integration/conftest.py) is reused, so the two
doors are compared on the very same service: same policy checks, same outage handling, one
rate-limit bucket.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.fakes.fixtures import SESSION_NS, SESSION_POD, SESSION_SA
from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.integration.cp_rig import CP

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


async def exchange(cp: CP, token: str, **fields: str) -> httpx.Response:
    data = {"grant_type": GRANT, "subject_token": token, "subject_token_type": JWT_TYPE}
    return await cp.client.post("/oauth2/token", data={**data, **fields})


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("ns_not_labelled", "namespace"),
        ("sa_not_labelled", "not managed"),
        ("unbound", "not bound to a pod"),
        ("not_session_sa", "not a session runner"),
        ("wrong_audience", "audience"),
        ("deleted_pod", "not authenticated"),
    ],
)
async def test_subject_refusals_are_400_invalid_request(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str, case: str, reason: str
) -> None:
    k = kube_apiserver
    if case == "ns_not_labelled":
        k.set_namespace_labels(SESSION_NS, {})
    if case == "sa_not_labelled":
        k.set_service_account_labels(SESSION_NS, SESSION_SA, {})
    if case == "not_session_sa":
        k.add_service_account(SESSION_NS, "default", labels={})
        k.add_pod(SESSION_NS, "other-pod", "default")
        token = k.issue_bound_token(SESSION_NS, "default", pod="other-pod")
    elif case == "unbound":
        token = k.issue_bound_token(SESSION_NS, SESSION_SA)
    elif case == "wrong_audience":
        token = k.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD, audiences=["x"])
    else:
        token = k.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    if case == "deleted_pod":
        k.delete_pod(SESSION_NS, SESSION_POD)
    cp = make_cp(authn)
    resp = await exchange(cp, token)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "invalid_request"
    description = resp.json()["error_description"]
    assert description.startswith("subject_token not ") and reason in description
    assert token not in resp.text and "www-authenticate" not in resp.headers
    # GET /token refuses the same subject, with its own protocol's status
    assert (await cp.get(token)).status_code in (401, 403)


@pytest.mark.parametrize("mode", ["500", "reset"])
async def test_failing_api_server_is_503_not_400(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str, mode: str
) -> None:
    cp = make_cp(authn)
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    kube_apiserver.fail(None, mode)
    resp = await exchange(cp, token)
    kube_apiserver.fail(None, None)
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"] == "temporarily_unavailable"
    assert int(resp.headers["retry-after"]) >= 1
    cp.clock.advance(2)  # the outage is not remembered as a refusal
    assert (await exchange(cp, token)).status_code == 200


async def test_one_rate_limit_bucket_for_both_doors(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    cp = make_cp(authn, CP_TOKEN_RATE_LIMIT="1/s,3")
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    statuses = [
        (await cp.get(token)).status_code,
        (await exchange(cp, token)).status_code,
        (await cp.get(token)).status_code,
    ]
    assert statuses == [200, 200, 200]
    limited = await exchange(cp, token)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert (await cp.get(token)).status_code == 429
    cp.clock.advance(1.0)
    assert (await exchange(cp, token)).status_code == 200


async def test_exchange_reuses_the_review_and_label_caches(
    kube_apiserver: FakeKubeAPIServer, make_cp: Any, authn: str
) -> None:
    cp = make_cp(authn, CP_TOKEN_EXCHANGE_AUDIENCES="ambient-api-server,mcp")
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    assert (await cp.get(token)).status_code == 200
    kube_apiserver.reset_counts()
    for audience in ("mcp", "ambient-api-server", "mcp"):
        assert (await exchange(cp, token, audience=audience)).status_code == 200
    assert kube_apiserver.calls() == 0
    assert (await exchange(cp, token, audience="kube")).json()["error"] == "invalid_target"
