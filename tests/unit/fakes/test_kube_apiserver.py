"""The fakes behave like the real kube-apiserver and OAuth 2.0 token endpoint.

Each test reaches a fake the way the product does: over real sockets, TLS verified against
the CA in the kubeconfig, through httpx or the official Kubernetes client.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from tests.fakes import fixtures
from tests.fakes.fixtures import SESSION_NS, SESSION_POD, SESSION_SA
from tests.fakes.idp import FakeIdP
from tests.fakes.kube_apiserver import DEFAULT_ISSUER, FakeKubeAPIServer

# The lead's conftest imports these for the whole suite; bind them here so this file also
# runs on its own.
kube_apiserver = fixtures.kube_apiserver
kubeconfig = fixtures.kubeconfig
idp = fixtures.idp

TOKENREVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
SSAR = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
API_AUD = DEFAULT_ISSUER


def _load(kubeconfig_path: Path) -> k8s.Configuration:
    cfg = k8s.Configuration()
    k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig_path), client_configuration=cfg
    )
    return cfg


@pytest.fixture
def http(kubeconfig: Path) -> Iterator[httpx.Client]:
    """An httpx client configured only from the kubeconfig, as the product would build it."""
    cfg = _load(kubeconfig)
    ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
    bearer = str(cfg.auth_settings()["BearerToken"]["value"])
    with httpx.Client(
        base_url=cfg.host, verify=ctx, headers={"Authorization": bearer}, timeout=5
    ) as client:
        yield client


def review(http: httpx.Client, token: str, audiences: list[str] | None = None) -> dict[str, Any]:
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": audiences if audiences is not None else []},
    }
    r = http.post(TOKENREVIEWS, json=body)
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    assert doc["kind"] == "TokenReview"
    assert doc["spec"]["token"] == token
    return doc["status"]  # type: ignore[no-any-return]


def _claims(token: str) -> dict[str, Any]:
    seg = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))  # type: ignore[no-any-return]


def _header(token: str) -> dict[str, Any]:
    seg = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))  # type: ignore[no-any-return]


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run `fn` in a thread; the list receives its result or exception."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# -- kubeconfig, objects, official client --------------------------------------------------


def test_official_client_reads_objects_and_creates_tokenreview(
    kube_apiserver: FakeKubeAPIServer, kubeconfig: Path
) -> None:
    api: Any = k8s.ApiClient(_load(kubeconfig))
    core: Any = k8s.CoreV1Api(api)
    ns = core.read_namespace(SESSION_NS)
    assert ns.metadata.labels["ambient-code.io/managed"] == "true"
    assert ns.metadata.labels["kubernetes.io/metadata.name"] == SESSION_NS
    sa = core.read_namespaced_service_account(SESSION_SA, SESSION_NS)
    assert sa.metadata.labels == {"ambient-code.io/managed-by": "ambient-control-plane"}
    assert sa.metadata.uid == kube_apiserver.uid("serviceaccounts", SESSION_NS, SESSION_SA)
    pod = core.read_namespaced_pod(SESSION_POD, SESSION_NS)
    assert pod.spec.service_account_name == SESSION_SA
    assert pod.status.phase == "Running"
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod("nope", SESSION_NS)
    assert err.value.status == 404
    assert json.loads(str(err.value.body))["reason"] == "NotFound"

    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, SESSION_POD)
    auth: Any = k8s.AuthenticationV1Api(api)
    tr = auth.create_token_review(
        k8s.V1TokenReview(spec=k8s.V1TokenReviewSpec(token=token, audiences=["ambient-cp"]))
    )
    assert tr.status.authenticated is True
    assert tr.status.user.username == f"system:serviceaccount:{SESSION_NS}:{SESSION_SA}"
    assert tr.status.audiences == ["ambient-cp"]
    api.close()


def test_objects_have_kubernetes_shape(
    kube_apiserver: FakeKubeAPIServer, http: httpx.Client
) -> None:
    kube_apiserver.add_service_account(SESSION_NS, "plain-sa")
    sa = http.get(f"/api/v1/namespaces/{SESSION_NS}/serviceaccounts/plain-sa").json()
    assert sa["kind"] == "ServiceAccount" and sa["apiVersion"] == "v1"
    assert set(sa["metadata"]) == {
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    }  # no labels: the key is absent, as in Kubernetes
    kube_apiserver.set_service_account_labels(SESSION_NS, "plain-sa", {"a": "b"})
    sa2 = http.get(f"/api/v1/namespaces/{SESSION_NS}/serviceaccounts/plain-sa").json()
    assert sa2["metadata"]["labels"] == {"a": "b"}
    assert int(sa2["metadata"]["resourceVersion"]) > int(sa["metadata"]["resourceVersion"])
    r = http.get("/api/v1/namespaces/absent")
    assert r.status_code == 404
    assert r.json() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'namespaces "absent" not found',
        "reason": "NotFound",
        "details": {"name": "absent", "kind": "namespaces"},
        "code": 404,
    }


async def test_concurrent_async_clients(
    kube_apiserver: FakeKubeAPIServer, kubeconfig: Path
) -> None:
    cfg = _load(kubeconfig)
    ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
    bearer = str(cfg.auth_settings()["BearerToken"]["value"])
    kube_apiserver.set_latency(0.05, "namespaces")
    async with httpx.AsyncClient(
        base_url=cfg.host, verify=ctx, headers={"Authorization": bearer}
    ) as client:
        answers = await asyncio.gather(
            *(client.get(f"/api/v1/namespaces/{SESSION_NS}") for _ in range(20))
        )
    assert {r.status_code for r in answers} == {200}
    assert kube_apiserver.calls("namespaces") == 20


# -- TokenReview ---------------------------------------------------------------------------


def test_tokenreview_accepts_bound_token(
    kube_apiserver: FakeKubeAPIServer, http: httpx.Client
) -> None:
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, SESSION_POD)
    claims = _claims(token)
    assert claims["aud"] == ["ambient-cp"]
    assert claims["sub"] == f"system:serviceaccount:{SESSION_NS}:{SESSION_SA}"
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["kubernetes.io"]["pod"]["name"] == SESSION_POD
    assert set(_header(token)) == {"alg", "kid"}

    status = review(http, token, ["other", "ambient-cp"])
    assert status["authenticated"] is True
    assert status["audiences"] == ["ambient-cp"]
    user = status["user"]
    assert user["username"] == f"system:serviceaccount:{SESSION_NS}:{SESSION_SA}"
    assert user["uid"] == kube_apiserver.uid("serviceaccounts", SESSION_NS, SESSION_SA)
    assert user["groups"] == [
        "system:serviceaccounts",
        f"system:serviceaccounts:{SESSION_NS}",
        "system:authenticated",
    ]
    extra = user["extra"]
    prefix = "authentication.kubernetes.io/"
    assert extra[prefix + "pod-name"] == [SESSION_POD]
    assert extra[prefix + "pod-uid"] == [kube_apiserver.uid("pods", SESSION_NS, SESSION_POD)]
    assert extra[prefix + "node-name"] == ["fake-node-1"]
    assert extra[prefix + "credential-id"] == [f"JTI={claims['jti']}"]
    assert prefix + "node-uid" in extra


def _forged(kube: FakeKubeAPIServer) -> str:
    """Same claims, same kid, signed by a key the API server does not have."""
    good = kube.issue_bound_token(SESSION_NS, SESSION_SA, SESSION_POD)
    foreign = RSAKey.generate_key(2048)
    return jwt.encode(_header(good), _claims(good), foreign, default_type=None)


def _tampered(kube: FakeKubeAPIServer) -> str:
    token = kube.issue_bound_token(SESSION_NS, SESSION_SA, SESSION_POD)
    head, _, sig = token.split(".")
    claims = _claims(token)
    claims["sub"] = "system:serviceaccount:kube-system:admin"
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{body}.{sig}"


def _deleted_pod(kube: FakeKubeAPIServer) -> str:
    token = kube.issue_bound_token(SESSION_NS, SESSION_SA, SESSION_POD)
    kube.delete_pod(SESSION_NS, SESSION_POD)
    return token


def _recreated_pod(kube: FakeKubeAPIServer) -> str:
    token = _deleted_pod(kube)
    kube.add_pod(SESSION_NS, SESSION_POD, SESSION_SA)
    return token


def _held(resource: str, name: str, ago: float) -> Callable[[FakeKubeAPIServer], str]:
    """A token of the session's pod, whose pod or ServiceAccount was deleted ``ago`` seconds
    ago and is still held by a finalizer."""

    def make(kube: FakeKubeAPIServer) -> str:
        token = kube.issue_bound_token(SESSION_NS, SESSION_SA, SESSION_POD)
        kube.hold_deletion(resource, SESSION_NS, name, at=time.time() - ago)
        return token

    return make


def test_a_deletion_held_by_a_finalizer_counts_60_s_later(
    kube_apiserver: FakeKubeAPIServer, http: httpx.Client
) -> None:
    """kube-apiserver (pkg/serviceaccount/claims.go) refuses a token when its pod or
    ServiceAccount was deleted more than the leeway (60 s) ago, although the object is still
    there; until then it authenticates."""
    token = _held("pods", SESSION_POD, 50)(kube_apiserver)
    assert review(http, token, ["ambient-cp"])["authenticated"] is True
    pod = http.get(f"/api/v1/namespaces/{SESSION_NS}/pods/{SESSION_POD}").json()["metadata"]
    assert pod["deletionGracePeriodSeconds"] == 0 and pod["finalizers"] == ["example.com/hold"]
    assert pod["deletionTimestamp"].endswith("Z") and len(pod["deletionTimestamp"]) == 20


def _recreated_sa(kube: FakeKubeAPIServer) -> str:
    token = kube.issue_bound_token(SESSION_NS, SESSION_SA)
    kube.delete_service_account(SESSION_NS, SESSION_SA)
    kube.add_service_account(SESSION_NS, SESSION_SA)
    return token


REJECTED: dict[str, tuple[Callable[[FakeKubeAPIServer], str], list[str], str]] = {
    "wrong audience": (
        lambda k: k.issue_bound_token(SESSION_NS, SESSION_SA, SESSION_POD, audiences=["x"]),
        ["ambient-cp"],
        'token audiences ["x"] is invalid for the target audiences ["ambient-cp"]',
    ),
    "API-audience token, CP audience requested": (
        lambda k: k.issue_bound_token(SESSION_NS, SESSION_SA, SESSION_POD, audiences=[API_AUD]),
        ["ambient-cp"],
        "is invalid for the target audiences",
    ),
    "expired": (
        lambda k: k.issue_bound_token(
            SESSION_NS, SESSION_SA, SESSION_POD, expiration_seconds=600, now=time.time() - 3600
        ),
        ["ambient-cp"],
        "service account token has expired",
    ),
    "not yet valid": (
        lambda k: k.issue_bound_token(SESSION_NS, SESSION_SA, SESSION_POD, now=time.time() + 600),
        ["ambient-cp"],
        "service account token is not valid yet",
    ),
    "deleted pod": (_deleted_pod, ["ambient-cp"], "service account token has been invalidated"),
    "recreated pod": (_recreated_pod, ["ambient-cp"], "does not match service account pod ref"),
    "pod deleted 70 s ago, held by a finalizer": (
        _held("pods", SESSION_POD, 70),
        ["ambient-cp"],
        "service account token has been invalidated",
    ),
    "service account deleted 70 s ago, held by a finalizer": (
        _held("serviceaccounts", SESSION_SA, 70),
        ["ambient-cp"],
        f"service account {SESSION_NS}/{SESSION_SA} has been deleted",
    ),
    "recreated service account": (_recreated_sa, ["ambient-cp"], "does not match claim"),
    "foreign signature": (_forged, ["ambient-cp"], "error in cryptographic primitive"),
    "tampered payload": (_tampered, ["ambient-cp"], "error in cryptographic primitive"),
    "legacy token, CP audience": (
        lambda k: k.issue_legacy_token(SESSION_NS, SESSION_SA),
        ["ambient-cp"],
        "is invalid for the target audiences",
    ),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_tokenreview_rejects(
    case: str, kube_apiserver: FakeKubeAPIServer, http: httpx.Client
) -> None:
    make, audiences, error = REJECTED[case]
    status = review(http, make(kube_apiserver), audiences)
    # Kubernetes omits `authenticated` when false (omitempty) and always sends `user`.
    assert "authenticated" not in status
    assert status["user"] == {}
    assert status["error"].startswith("[invalid bearer token, ")
    assert error in status["error"]
    assert "audiences" not in status


def test_tokenreview_garbage_and_other_issuer_are_not_recognised(
    kube_apiserver: FakeKubeAPIServer, http: httpx.Client
) -> None:
    unknown = {"user": {}, "error": "invalid bearer token"}
    assert review(http, "not-a-jwt", ["ambient-cp"]) == unknown
    other = kube_apiserver.sign_claims({"iss": "https://elsewhere", "aud": ["ambient-cp"]})
    assert review(http, other, ["ambient-cp"]) == unknown


def test_legacy_token_counts_as_api_audience(
    kube_apiserver: FakeKubeAPIServer, http: httpx.Client
) -> None:
    token = kube_apiserver.issue_legacy_token(SESSION_NS, SESSION_SA)
    claims = _claims(token)
    assert claims["iss"] == "kubernetes/serviceaccount"
    assert "exp" not in claims and "aud" not in claims
    for auds in ([], [API_AUD], ["ambient-cp", API_AUD]):
        status = review(http, token, auds)
        assert status["authenticated"] is True, auds
        assert status["audiences"] == [API_AUD]
        assert "extra" not in status["user"]  # not pod-bound
    kube_apiserver.delete_service_account(SESSION_NS, SESSION_SA)
    # kube-apiserver's token cache: a success is remembered 10 s per token and audiences
    assert review(http, token, [])["authenticated"] is True
    kube_apiserver.forget_reviews()
    assert "authenticated" not in review(http, token, [])


def test_secret_bound_token_is_not_pod_bound(
    kube_apiserver: FakeKubeAPIServer, http: httpx.Client
) -> None:
    kube_apiserver.add_secret(SESSION_NS, "s1")
    token = kube_apiserver.issue_secret_bound_token(SESSION_NS, SESSION_SA, "s1")
    status = review(http, token, ["ambient-cp"])
    assert status["authenticated"] is True
    assert list(status["user"]["extra"]) == ["authentication.kubernetes.io/credential-id"]
    kube_apiserver.delete_secret(SESSION_NS, "s1")
    assert review(http, token, ["ambient-cp"])["authenticated"] is True  # the 10 s cache
    kube_apiserver.forget_reviews()
    assert "authenticated" not in review(http, token, ["ambient-cp"])


def test_tokenreview_request_validation(http: httpx.Client) -> None:
    body = b'{"spec": {"token": "x"}}'
    r = http.post(TOKENREVIEWS, content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["reason"] == "UnsupportedMediaType"
    assert http.post(TOKENREVIEWS, content=body).status_code == 201  # no type: JSON
    r = http.post(TOKENREVIEWS, json={"spec": {"token": ""}})
    assert r.status_code == 400 and "token is required" in r.json()["message"]
    r = http.post(TOKENREVIEWS, json={"kind": "Pod", "spec": {"token": "x"}})
    assert r.status_code == 400
    assert http.post(TOKENREVIEWS, json={"spec": {"token": "x"}}).status_code == 201


# -- issuer discovery and keys -------------------------------------------------------------


def test_jwks_verifies_tokens_across_rotation(
    kube_apiserver: FakeKubeAPIServer, http: httpx.Client
) -> None:
    disco = http.get("/.well-known/openid-configuration")
    assert disco.headers["cache-control"].startswith("public, max-age=")
    doc = disco.json()
    assert doc["issuer"] == DEFAULT_ISSUER
    # like the real server without --service-account-jwks-uri: its own address
    assert doc["jwks_uri"] == f"{kube_apiserver.url}/openid/v1/jwks"
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]

    old = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, SESSION_POD)
    r = http.get("/openid/v1/jwks")
    assert r.headers["content-type"] == "application/jwk-set+json"
    jwks = r.json()
    (key,) = jwks["keys"]
    assert key["use"] == "sig" and key["alg"] == "RS256"
    assert key["kid"] == _header(old)["kid"] == RSAKey.import_key(key).thumbprint()
    assert jwt.decode(old, KeySet.import_key_set(jwks)).claims["iss"] == DEFAULT_ISSUER

    new_kid = kube_apiserver.rotate_signing_key("ES256")
    new = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, SESSION_POD)
    assert _header(new) == {"alg": "ES256", "kid": new_kid}
    keys = KeySet.import_key_set(http.get("/openid/v1/jwks").json())
    for token in (old, new):
        jwt.decode(token, keys, algorithms=["RS256", "ES256"])
        assert review(http, token, ["ambient-cp"])["authenticated"] is True

    kube_apiserver.drop_old_keys()
    kube_apiserver.forget_reviews()
    assert [k["kid"] for k in http.get("/openid/v1/jwks").json()["keys"]] == [new_kid]
    assert "authenticated" not in review(http, old, ["ambient-cp"])
    assert review(http, new, ["ambient-cp"])["authenticated"] is True


# -- caller authentication and RBAC --------------------------------------------------------


def test_caller_without_known_token_gets_401_and_none_is_anonymous(
    kube_apiserver: FakeKubeAPIServer, http: httpx.Client
) -> None:
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}):
        r = http.get(f"/api/v1/namespaces/{SESSION_NS}", headers=headers)
        assert r.status_code == 401
        assert r.json()["reason"] == "Unauthorized"
    ctx = ssl.create_default_context(cadata=kube_apiserver.ca_pem.decode())
    bare = httpx.get(f"{kube_apiserver.url}/openid/v1/jwks", verify=ctx)
    # no credentials at all: system:anonymous, whom RBAC refuses (the real default)
    assert bare.status_code == 403
    assert (
        bare.json()["message"]
        == 'forbidden: User "system:anonymous" cannot get path "/openid/v1/jwks"'
    )


def _ssar(http: httpx.Client, verb: str, group: str, resource: str) -> bool:
    body = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": verb, "group": group, "resource": resource}},
    }
    r = http.post(SSAR, json=body)
    assert r.status_code == 201
    return bool(r.json()["status"]["allowed"])


def test_deny_gives_403_and_ssar_says_no(
    kube_apiserver: FakeKubeAPIServer, http: httpx.Client
) -> None:
    assert _ssar(http, "create", "authentication.k8s.io", "tokenreviews") is True
    assert _ssar(http, "list", "", "secrets") is False
    kube_apiserver.deny("create", "authentication.k8s.io", "tokenreviews")
    kube_apiserver.deny("get", "", "pods")
    assert _ssar(http, "create", "authentication.k8s.io", "tokenreviews") is False

    r = http.post(TOKENREVIEWS, json={"kind": "TokenReview", "spec": {"token": "x"}})
    assert r.status_code == 403
    assert r.json()["message"] == (
        'tokenreviews.authentication.k8s.io is forbidden: User "system:serviceaccount:cp:cp-token"'
        ' cannot create resource "tokenreviews" in API group "authentication.k8s.io" at the'
        " cluster scope"
    )
    r = http.get(f"/api/v1/namespaces/{SESSION_NS}/pods/{SESSION_POD}")
    assert r.status_code == 403
    assert r.json()["message"].endswith(f'in API group "" in the namespace "{SESSION_NS}"')
    assert http.get(f"/api/v1/namespaces/{SESSION_NS}").status_code == 200

    kube_apiserver.allow("create", "authentication.k8s.io", "tokenreviews")
    assert _ssar(http, "create", "authentication.k8s.io", "tokenreviews") is True


# -- faults and counters -------------------------------------------------------------------


def test_fail_500_counts_and_times(kube_apiserver: FakeKubeAPIServer, http: httpx.Client) -> None:
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, SESSION_POD)
    kube_apiserver.fail("tokenreviews", "500", times=2)
    body = {"kind": "TokenReview", "spec": {"token": token, "audiences": ["ambient-cp"]}}
    codes = [http.post(TOKENREVIEWS, json=body).status_code for _ in range(3)]
    assert codes == [500, 500, 201]
    assert kube_apiserver.calls("tokenreviews") == 3
    assert kube_apiserver.requests("tokenreviews")[0].json["spec"]["audiences"] == ["ambient-cp"]

    kube_apiserver.fail(None, "500")
    r = http.get(f"/api/v1/namespaces/{SESSION_NS}")
    assert r.status_code == 500 and r.json()["reason"] == "InternalError"
    kube_apiserver.fail(None, None)
    assert http.get(f"/api/v1/namespaces/{SESSION_NS}").status_code == 200
    assert kube_apiserver.calls("namespaces") == 2
    assert kube_apiserver.calls() == 5
    kube_apiserver.reset_counts()
    assert kube_apiserver.calls() == 0


def test_fail_reset_aborts_without_response(
    kube_apiserver: FakeKubeAPIServer, http: httpx.Client
) -> None:
    kube_apiserver.fail("pods", "reset")
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        http.get(f"/api/v1/namespaces/{SESSION_NS}/pods/{SESSION_POD}")
    assert http.get(f"/api/v1/namespaces/{SESSION_NS}").status_code == 200
    kube_apiserver.fail("pods", None)
    assert http.get(f"/api/v1/namespaces/{SESSION_NS}/pods/{SESSION_POD}").status_code == 200
    assert kube_apiserver.calls("pods") == 2


def test_hang_times_out_is_released_on_clear_and_reset_on_stop(
    kube_apiserver: FakeKubeAPIServer, http: httpx.Client
) -> None:
    path = "/openid/v1/jwks"
    kube_apiserver.fail("jwks", "hang")
    with pytest.raises(httpx.ReadTimeout):
        http.get(path, timeout=0.2)

    # Cleared: a held request is answered.
    t, out = in_thread(lambda: http.get(path, timeout=5).status_code)
    assert kube_apiserver.wait_for_calls("jwks", 2)  # the held request has arrived
    kube_apiserver.fail("jwks", None)
    t.join(5)
    assert out == [200]

    # Stopped: a held request is reset, and stop() does not wait for it.
    kube_apiserver.fail("jwks", "hang")
    t, out = in_thread(lambda: http.get(path, timeout=5))
    assert kube_apiserver.wait_for_calls("jwks", 3)
    started = time.monotonic()
    kube_apiserver.stop()
    assert time.monotonic() - started < 2
    t.join(5)
    assert isinstance(out[0], httpx.RemoteProtocolError | httpx.ReadError)


def test_fail_429_answers_like_priority_and_fairness(
    kube_apiserver: FakeKubeAPIServer, http: httpx.Client
) -> None:
    kube_apiserver.fail("namespaces", "429", retry_after=10, times=1)
    r = http.get(f"/api/v1/namespaces/{SESSION_NS}")
    assert r.status_code == 429 and r.headers["retry-after"] == "10"
    assert r.json()["reason"] == "TooManyRequests"
    assert r.json()["details"] == {"retryAfterSeconds": 10}
    assert http.get(f"/api/v1/namespaces/{SESSION_NS}").status_code == 200
    kube_apiserver.fail(None, "429", retry_after=None)
    r = http.get(f"/api/v1/namespaces/{SESSION_NS}/pods/{SESSION_POD}")
    assert r.status_code == 429 and "retry-after" not in r.headers


def test_a_key_can_sign_before_it_is_published(
    kube_apiserver: FakeKubeAPIServer, http: httpx.Client
) -> None:
    old_kid = kube_apiserver.signing_kid
    new_kid = kube_apiserver.rotate_signing_key("ES256", publish=False)
    token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, SESSION_POD)
    assert [k["kid"] for k in http.get("/openid/v1/jwks").json()["keys"]] == [old_kid]
    assert kube_apiserver.review(token, ["ambient-cp"])["authenticated"] is True
    kube_apiserver.publish_keys()
    assert [k["kid"] for k in http.get("/openid/v1/jwks").json()["keys"]] == [old_kid, new_kid]


def test_latency_applies_per_route(kube_apiserver: FakeKubeAPIServer, http: httpx.Client) -> None:
    kube_apiserver.set_latency(0.3, "namespaces")
    started = time.monotonic()
    assert http.get(f"/api/v1/namespaces/{SESSION_NS}").status_code == 200
    assert time.monotonic() - started >= 0.3
    kube_apiserver.set_latency(0, "namespaces")
    started = time.monotonic()
    http.get(f"/api/v1/namespaces/{SESSION_NS}")
    assert time.monotonic() - started < 0.3


def test_restart_keeps_the_address(kube_apiserver: FakeKubeAPIServer, http: httpx.Client) -> None:
    url = kube_apiserver.url
    kube_apiserver.stop()
    with pytest.raises(httpx.ConnectError):
        http.get(f"/api/v1/namespaces/{SESSION_NS}")
    kube_apiserver.start()
    assert kube_apiserver.url == url
    assert http.get(f"/api/v1/namespaces/{SESSION_NS}").status_code == 200


# -- IdP -----------------------------------------------------------------------------------


def test_idp_client_secret_basic(idp: FakeIdP) -> None:
    r = httpx.post(
        idp.token_url,
        data={"grant_type": "client_credentials", "scope": "api", "audience": "ambient-api"},
        auth=(idp.client_id, idp.client_secret),
    )
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    doc = r.json()
    assert doc["token_type"] == "Bearer" and doc["expires_in"] == 3600
    assert idp.issued_tokens == [doc["access_token"]]
    assert idp.last_form == {
        "grant_type": "client_credentials",
        "scope": "api",
        "audience": "ambient-api",
    }
    assert idp.last_auth_method == "client_secret_basic"


def test_idp_client_secret_post_and_expires_in(idp: FakeIdP) -> None:
    idp.set_expires_in(120)
    form = {
        "grant_type": "client_credentials",
        "client_id": idp.client_id,
        "client_secret": idp.client_secret,
    }
    r = httpx.post(idp.token_url, data=form)
    assert r.status_code == 200 and r.json()["expires_in"] == 120
    assert idp.last_auth_method == "client_secret_post"
    assert "client_secret" not in (idp.last_form or {})
    assert idp.calls() == 1


def test_idp_errors(idp: FakeIdP) -> None:
    good = (idp.client_id, idp.client_secret)
    r = httpx.post(idp.token_url, data={"grant_type": "client_credentials"}, auth=("x", "y"))
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    assert r.headers["www-authenticate"].startswith("Basic")
    r = httpx.post(idp.token_url, data={"grant_type": "password"}, auth=good)
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"
    r = httpx.post(idp.token_url, data={"scope": "x"}, auth=good)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    idp.set_credentials("rotated", "new-secret")
    r = httpx.post(idp.token_url, data={"grant_type": "client_credentials"}, auth=good)
    assert r.status_code == 401
    assert idp.issued_tokens == []


def test_idp_faults(idp: FakeIdP) -> None:
    form = {"grant_type": "client_credentials"}
    good = (idp.client_id, idp.client_secret)
    idp.fail("invalid_client", times=1)
    assert httpx.post(idp.token_url, data=form, auth=good).json()["error"] == "invalid_client"
    idp.fail("500")
    assert httpx.post(idp.token_url, data=form, auth=good).status_code == 500
    idp.fail("reset")
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        httpx.post(idp.token_url, data=form, auth=good)
    idp.fail("hang")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(idp.token_url, data=form, auth=good, timeout=0.2)
    idp.fail(None)
    idp.set_latency(0.2)
    started = time.monotonic()
    assert httpx.post(idp.token_url, data=form, auth=good).status_code == 200
    assert time.monotonic() - started >= 0.2
    assert idp.calls() == 5


def test_idp_over_tls() -> None:
    with FakeIdP(tls=True) as server:
        assert server.token_url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cadata=server.ca_pem.decode())
        r = httpx.post(
            server.token_url,
            data={"grant_type": "client_credentials"},
            auth=(server.client_id, server.client_secret),
            verify=ctx,
        )
        assert r.status_code == 200
