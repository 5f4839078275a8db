"""Flow 2: refusals with real objects, in both authn modes.

Every object is real (namespace, ServiceAccount, pod, Secret, made through the API server and
its admission chain) and every token comes from the TokenRequest API. Each refusal is the
documented status with the documented body (``error``, ``error_description``) and, for 401,
``WWW-Authenticate`` as RFC 6750 §3.1 asks.
"""

from __future__ import annotations

import httpx

from .cluster import Cluster
from .session import CP_AUDIENCE, MANAGED_SA, CpServer, make_session, pod_token

BEARER_INVALID = 'Bearer error="invalid_token"'


def assert_refused(
    resp: httpx.Response, status: int, error: str, *phrases: str, www_authenticate: str | None
) -> None:
    """The documented refusal: status, JSON body with ``error`` and an ``error_description``
    that says why (``phrases``), ``Cache-Control: no-store``, and ``WWW-Authenticate``
    exactly when given."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "error_description"}, body
    assert body["error"] == error
    assert isinstance(body["error_description"], str) and body["error_description"]
    for phrase in phrases:
        assert phrase in body["error_description"], body
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers.get("www-authenticate") == www_authenticate
    assert "retry-after" not in resp.headers, "a refusal is not a 'come back later'"


def test_a_serviceaccount_without_the_managed_label_is_403(cluster: Cluster, cp: CpServer) -> None:
    session = make_session(cluster, f"nolabel{cp.mode[:4]}", sa_labels={})
    resp = cp.get_token(pod_token(cluster, session))
    assert_refused(
        resp,
        403,
        "access_denied",
        "not managed",
        "ambient-code.io/managed-by=ambient-control-plane",
        www_authenticate=None,
    )


def test_a_serviceaccount_with_another_label_value_is_403(cluster: Cluster, cp: CpServer) -> None:
    session = make_session(
        cluster, f"otherval{cp.mode[:4]}", sa_labels={"ambient-code.io/managed-by": "someone"}
    )
    resp = cp.get_token(pod_token(cluster, session))
    assert_refused(resp, 403, "access_denied", "not managed", www_authenticate=None)


def test_a_namespace_without_its_label_is_403(cluster: Cluster, cp: CpServer) -> None:
    # Outside a managed namespace the injector's namespaceSelector does not match: the pod is
    # stored as sent, and its token is still a valid pod-bound one.
    session = make_session(cluster, f"nsnolabel{cp.mode[:4]}", ns_labels={})
    assert "initContainers" not in session.pod_object["spec"]
    resp = cp.get_token(pod_token(cluster, session))
    assert_refused(
        resp,
        403,
        "access_denied",
        f"namespace {session.namespace} is not managed",
        "ambient-code.io/managed=true",
        www_authenticate=None,
    )


def test_a_serviceaccount_that_is_not_a_session_runner_is_403(
    cluster: Cluster, cp: CpServer
) -> None:
    # labelled and in a managed namespace, but not named session-<id>-sa
    session = make_session(
        cluster, f"notsess{cp.mode[:4]}", sa_name="builder", sa_labels=MANAGED_SA
    )
    resp = cp.get_token(pod_token(cluster, session))
    assert_refused(
        resp,
        403,
        "access_denied",
        f"system:serviceaccount:{session.namespace}:builder is not a session runner",
        www_authenticate=None,
    )


def test_a_token_for_the_api_servers_own_audience_is_401(cluster: Cluster, cp: CpServer) -> None:
    session = make_session(cluster, f"apiaud{cp.mode[:4]}")
    # no --audience: the API server's own (--api-audiences), the automounted token's
    token = cluster.create_token(session.namespace, session.service_account, pod=session.pod)
    review = cluster.token_review(token, [])
    assert review["status"]["authenticated"] is True, "a valid token, just not for the CP"
    resp = cp.get_token(token)
    assert_refused(
        resp,
        401,
        "invalid_token",
        "audience",
        CP_AUDIENCE,
        www_authenticate=BEARER_INVALID,
    )


def test_a_secret_bound_token_is_403_not_pod_bound(cluster: Cluster, cp: CpServer) -> None:
    session = make_session(cluster, f"secret{cp.mode[:4]}")
    cluster.apply_objects(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "bound-to-me", "namespace": session.namespace},
            "type": "Opaque",
        }
    )
    token = cluster.create_token(
        session.namespace, session.service_account, audience=CP_AUDIENCE, secret="bound-to-me"
    )
    # The API server authenticates it (for the CP's audience), bound to the Secret
    review = cluster.token_review(token, [CP_AUDIENCE])["status"]
    assert review["authenticated"] is True
    extra = review["user"].get("extra", {})
    assert "authentication.kubernetes.io/pod-name" not in extra
    resp = cp.get_token(token)
    assert_refused(resp, 403, "access_denied", "not bound to a pod", www_authenticate=None)


def test_a_token_cannot_be_bound_to_another_serviceaccounts_pod(
    cluster: Cluster, cp: CpServer
) -> None:
    """The TokenRequest API itself refuses to bind a token to a pod of another
    ServiceAccount, even in the same namespace: a session cannot borrow another's pod."""
    a = make_session(cluster, f"bindera{cp.mode[:4]}")
    b = make_session(cluster, f"binderb{cp.mode[:4]}", namespace=a.namespace)
    done = cluster.kubectl(
        "create",
        "token",
        a.service_account,
        "-n",
        a.namespace,
        f"--audience={CP_AUDIENCE}",
        "--bound-object-kind=Pod",
        f"--bound-object-name={b.pod}",
        check=False,
    )
    assert done.returncode != 0, done.stdout
    assert "cannot bind token" in done.stderr and a.service_account in done.stderr, done.stderr


def test_no_credentials_and_garbage_are_401(cp: CpServer) -> None:
    with cp.client() as c:
        missing = c.get("/token", timeout=10)
        garbage = c.get("/token", headers={"Authorization": "Bearer not.a.jwt"}, timeout=10)
    assert_refused(missing, 401, "invalid_token", www_authenticate="Bearer")
    assert_refused(garbage, 401, "invalid_token", www_authenticate=BEARER_INVALID)
