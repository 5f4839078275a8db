"""The fake API server held to the real one.

The same objects on both (a namespace, a labelled session ServiceAccount, a pod on a node, a
Secret, a ServiceAccount without permissions), the same requests to both, with the same
identities (the CP's ServiceAccount, one without permissions, anonymous, unknown
credentials); then, per request: the same status code, the same media type and
``Cache-Control``, and the same JSON: exactly, for errors and Status objects (uids aside),
or the same shape (keys and types), where values are inherently each server's own (uids,
timestamps, tokens, keys). For objects read back, what the fake sends is a part of what the
real server sends, with the same types. And the tokens each side issues (TokenRequest on
the real one) have the same header and claims.

The fake serves only what the CP uses, so it has no write routes and never answers 409; an
unknown path or method is answered as the real server does (403 before 404/405).
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from joserfc import jws
from joserfc.jwk import RSAKey

from tests.fakes.kube_apiserver import FakeKubeAPIServer

from .cluster import ISSUER, Cluster
from .session import (
    CONTROL_PLANE,
    CP_AUDIENCE,
    CP_NAMESPACE,
    CP_SERVICE_ACCOUNT,
    MANAGED_NS,
    MANAGED_SA,
)

NS, SA, POD, NODE, SECRET = "fvr", "session-fvr-sa", "runner-fvr", "fvr-node", "fvr-secret"
NOPERMS = "no-perms"
# The CP's permissions (k8s/base's ClusterRole) under a name of its own: this test asks for
# what the CP may not, and the run checks that the CP's own ServiceAccount never got a 403.
TWIN = "cp-token-twin"
TWIN_USERNAME = f"system:serviceaccount:{CP_NAMESPACE}:{TWIN}"
READ_POD = "runner-read"  # never deleted
HELD_POD = "runner-held"  # deleted, held by a finalizer
HOLD = "example.com/hold"
AGENT = "cluster-tier/1"
TR = "/apis/authentication.k8s.io/v1/tokenreviews"
SSAR = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class Answer:
    status: int
    media: str
    cache_control: str | None
    body: Any


@dataclass
class Side:
    """One API server, as the CP and the others see it."""

    name: str
    url: str
    ctx: ssl.SSLContext
    identities: dict[str, str | None]  # who -> bearer (None: anonymous)
    pod_token: Callable[[], str]  # a fresh pod-bound token for ambient-cp
    api_token: Callable[[], str]  # a pod-bound token for the API server's own audience
    secret_token: Callable[[], str]  # a Secret-bound token for ambient-cp
    forge: Callable[[dict[str, Any], dict[str, Any]], str]  # (claims, header) -> JWT
    uids: dict[str, str]  # sa, pod -> uid
    delete: Callable[[str, str], None]  # (resource, name) in NS, gone at once
    hold_pod: Callable[[str], None]  # a new pod in NS, deleted at once, held by a finalizer
    release_pod: Callable[[str], None]  # its finalizer removed: gone

    def call(
        self,
        method: str,
        path: str,
        who: str = "cp",
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Answer:
        hd = {"User-Agent": AGENT, **(headers or {})}
        token = self.identities[who]
        if token is not None:
            hd["Authorization"] = f"Bearer {token}"
        content = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if body is not None and "Content-Type" not in hd:
            hd["Content-Type"] = "application/json"
        with httpx.Client(base_url=self.url, verify=self.ctx, trust_env=False, timeout=30) as c:
            resp = c.request(method, path, headers=hd, content=content)
        media = resp.headers.get("content-type", "").split(";")[0].strip()
        try:
            parsed: Any = resp.json()
        except ValueError:
            parsed = resp.text
        return Answer(resp.status_code, media, resp.headers.get("cache-control"), parsed)

    def review(self, token: str, audiences: list[str] | None) -> Answer:
        spec: dict[str, Any] = {"token": token}
        if audiences is not None:
            spec["audiences"] = audiences
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        return self.call("POST", TR, body=body)


def shape(value: Any) -> Any:
    """Keys and types, recursively; list lengths kept."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


def part_of(fake: Any, real: Any, where: str = "") -> list[str]:
    """Where ``fake`` is not a part of ``real`` (a key the real one lacks, another type)."""
    if isinstance(fake, dict):
        if not isinstance(real, dict):
            return [f"{where}: object vs {type(real).__name__}"]
        out = []
        for k, v in fake.items():
            if k not in real:
                out.append(f"{where}.{k}: only in the fake")
            else:
                out += part_of(v, real[k], f"{where}.{k}")
        return out
    if isinstance(fake, list):
        if not isinstance(real, list):
            return [f"{where}: array vs {type(real).__name__}"]
        if fake and real:
            return part_of(fake[0], real[0], f"{where}[0]")
        return []
    return [] if shape(fake) == shape(real) else [f"{where}: {shape(fake)} vs {shape(real)}"]


def without_uids(value: Any) -> Any:
    """The JSON with every uid replaced (each server has its own)."""
    return json.loads(UID.sub("<uid>", json.dumps(value)))


def claims_of(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    def part(seg: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
        return doc

    head, payload, _ = token.split(".")
    return part(head), part(payload)


# -- the two sides ------------------------------------------------------------------------


def _real(cluster: Cluster) -> Side:
    cluster.apply_objects({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    cluster.apply_objects(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": MANAGED_NS}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": SA, "namespace": NS, "labels": MANAGED_SA},
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": NOPERMS, "namespace": NS},
        },
        as_user=CONTROL_PLANE,
    )
    cluster.apply_objects(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": POD, "namespace": NS},
            "spec": {
                "serviceAccountName": SA,
                "nodeName": NODE,
                "containers": [{"name": "runner", "image": "runner:latest"}],
            },
        },
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET, "namespace": NS}},
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": READ_POD, "namespace": NS},
            "spec": {
                "serviceAccountName": NOPERMS,
                "nodeName": NODE,
                "containers": [{"name": "runner", "image": "runner:latest"}],
            },
        },
    )
    cluster.apply_objects(
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": TWIN, "namespace": CP_NAMESPACE}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": TWIN},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": CP_SERVICE_ACCOUNT},
            "subjects": [{"kind": "ServiceAccount", "name": TWIN, "namespace": CP_NAMESPACE}],
        },
    )  # fmt: skip
    key = RSAKey.import_key(cluster.sa_key.read_bytes())
    kid = cluster.signing_kid()

    def forge(claims: dict[str, Any], header: dict[str, Any]) -> str:
        hdr = {"alg": "RS256", "kid": kid, **header}
        return jws.serialize_compact(hdr, json.dumps(claims).encode(), key, algorithms=["RS256"])

    def delete(resource: str, name: str) -> None:
        path = f"/api/v1/namespaces/{NS}/{resource}/{name}?gracePeriodSeconds=0"
        assert cluster.request("DELETE", path).status_code == 200
        cluster.wait_for(
            f"{resource}/{name} gone",
            lambda: cluster.request("GET", path.split("?")[0]).status_code == 404,
        )

    def hold_pod(name: str) -> None:
        cluster.apply_objects(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": NS, "finalizers": [HOLD]},
                "spec": {
                    "serviceAccountName": NOPERMS,
                    "nodeName": NODE,
                    "containers": [{"name": "runner", "image": "runner:latest"}],
                },
            }
        )
        path = f"/api/v1/namespaces/{NS}/pods/{name}?gracePeriodSeconds=0"
        assert cluster.request("DELETE", path).status_code == 200

    def release_pod(name: str) -> None:
        cluster.request(
            "PATCH",
            f"/api/v1/namespaces/{NS}/pods/{name}",
            body={"metadata": {"finalizers": None}},
            patch="merge",
        )

    def uid(path: str) -> str:
        got: str = cluster.get(path)["metadata"]["uid"]
        return got

    return Side(
        name="real",
        url=cluster.url,
        ctx=ssl.create_default_context(cafile=str(cluster.ca_file)),
        identities={
            "cp": cluster.create_token(CP_NAMESPACE, TWIN),
            "noperms": cluster.create_token(NS, NOPERMS),
            "anonymous": None,
            "unknown": "not-a-known-credential",
        },
        pod_token=lambda: cluster.create_token(NS, SA, audience=CP_AUDIENCE, pod=POD),
        api_token=lambda: cluster.create_token(NS, SA, pod=POD),
        secret_token=lambda: cluster.create_token(NS, SA, audience=CP_AUDIENCE, secret=SECRET),
        forge=forge,
        uids={
            "sa": uid(f"/api/v1/namespaces/{NS}/serviceaccounts/{SA}"),
            "pod": uid(f"/api/v1/namespaces/{NS}/pods/{POD}"),
        },
        delete=delete,
        hold_pod=hold_pod,
        release_pod=release_pod,
    )


def _fake(kube: FakeKubeAPIServer) -> Side:
    kube.add_namespace(NS, labels=MANAGED_NS)
    kube.add_service_account(NS, SA, labels=MANAGED_SA)
    kube.add_service_account(NS, NOPERMS)
    kube.add_pod(NS, POD, SA, node=NODE)
    kube.add_pod(NS, READ_POD, NOPERMS, node=NODE)
    kube.add_secret(NS, SECRET)
    kube.add_caller("no-perms-token", f"system:serviceaccount:{NS}:{NOPERMS}", permissions=())

    def forge(claims: dict[str, Any], header: dict[str, Any]) -> str:
        return kube.sign_claims(claims, header=header)

    def delete(resource: str, name: str) -> None:
        {"pods": kube.delete_pod, "serviceaccounts": kube.delete_service_account}.get(
            resource, kube.delete_secret
        )(NS, name)

    def hold_pod(name: str) -> None:
        kube.add_pod(NS, name, NOPERMS, node=NODE)
        kube.hold_deletion("pods", NS, name, finalizer=HOLD)

    return Side(
        name="fake",
        url=kube.url,
        ctx=ssl.create_default_context(cadata=kube.ca_pem.decode()),
        identities={
            "cp": "cp-sa-token",
            "noperms": "no-perms-token",
            "anonymous": None,
            "unknown": "not-a-known-credential",
        },
        pod_token=lambda: kube.issue_bound_token(NS, SA, pod=POD, audiences=[CP_AUDIENCE]),
        api_token=lambda: kube.issue_bound_token(NS, SA, pod=POD, audiences=[ISSUER]),
        secret_token=lambda: kube.issue_secret_bound_token(NS, SA, SECRET, [CP_AUDIENCE]),
        forge=forge,
        uids={"sa": kube.uid("serviceaccounts", NS, SA), "pod": kube.uid("pods", NS, POD)},
        delete=delete,
        hold_pod=hold_pod,
        release_pod=lambda name: kube.delete_pod(NS, name),
    )


@pytest.fixture(scope="module")
def sides(cluster: Cluster, applied: dict[str, str]) -> Iterator[tuple[Side, Side]]:
    with FakeKubeAPIServer(caller_username=TWIN_USERNAME, issuer=ISSUER) as kube:
        yield _real(cluster), _fake(kube)


def both(sides: tuple[Side, Side], ask: Callable[[Side], Answer]) -> tuple[Answer, Answer]:
    real, fake = sides
    return ask(real), ask(fake)


def assert_same(real: Answer, fake: Answer, how: str = "exact") -> None:
    """Same status, media type and Cache-Control; the body exactly (uids aside) or in shape."""
    assert (fake.status, fake.media, fake.cache_control) == (
        real.status,
        real.media,
        real.cache_control,
    ), f"real {real}\nfake {fake}"
    if how == "exact":
        assert without_uids(fake.body) == without_uids(real.body), f"real {real}\nfake {fake}"
    else:
        assert shape(fake.body) == shape(real.body), f"real {real.body}\nfake {fake.body}"


def review_status(answer: Answer) -> Any:
    assert answer.status == 201, answer
    return answer.body["status"]


# -- TokenReview --------------------------------------------------------------------------


def test_a_successful_review(sides: tuple[Side, Side]) -> None:
    real, fake = both(sides, lambda s: s.review(s.pod_token(), [CP_AUDIENCE]))
    assert_same(real, fake, "shape")
    r, f = real.body["status"], fake.body["status"]
    assert f["user"]["username"] == r["user"]["username"] == f"system:serviceaccount:{NS}:{SA}"
    assert f["user"]["groups"] == r["user"]["groups"]
    assert sorted(f["user"]["extra"]) == sorted(r["user"]["extra"])
    assert f["audiences"] == r["audiences"] == [CP_AUDIENCE]
    assert fake.body["metadata"]["managedFields"][0]["manager"] == "cluster-tier"
    assert without_uids(fake.body["metadata"]["managedFields"][0]["fieldsV1"]) == without_uids(
        real.body["metadata"]["managedFields"][0]["fieldsV1"]
    )


def test_a_secret_bound_review(sides: tuple[Side, Side]) -> None:
    real, fake = both(sides, lambda s: s.review(s.secret_token(), [CP_AUDIENCE]))
    assert_same(real, fake, "shape")
    assert list(fake.body["status"]["user"]["extra"]) == list(real.body["status"]["user"]["extra"])


@pytest.mark.parametrize(
    "case",
    ["not a JWT", "API audience for ambient-cp", "ambient-cp for the API audience"],
)
def test_reviews_that_fail(sides: tuple[Side, Side], case: str) -> None:
    def ask(s: Side) -> Answer:
        if case == "not a JWT":
            return s.review("not-a-jwt", [CP_AUDIENCE])
        if case == "API audience for ambient-cp":
            return s.review(s.api_token(), [CP_AUDIENCE])
        return s.review(s.pod_token(), None)  # no audiences: the API server's own

    real, fake = both(sides, ask)
    assert_same(real, fake, "shape")
    assert review_status(fake) == review_status(real)


@pytest.mark.parametrize(
    "case",
    ["expired 65 s ago", "expired 30 s ago", "not valid for 90 s", "unknown kid", "bad signature",
     "other issuer", "pod uid", "serviceaccount uid", "no exp"],
)  # fmt: skip
def test_reviews_of_forged_tokens(sides: tuple[Side, Side], case: str) -> None:
    def ask(s: Side) -> Answer:
        now = int(time.time())
        ref = {
            "namespace": NS,
            "pod": {"name": POD, "uid": s.uids["pod"]},
            "serviceaccount": {"name": SA, "uid": s.uids["sa"]},
        }
        claims: dict[str, Any] = {
            "aud": [CP_AUDIENCE],
            "exp": now + 600,
            "iat": now,
            "iss": ISSUER,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": ref,
            "nbf": now,
            "sub": f"system:serviceaccount:{NS}:{SA}",
        }
        header: dict[str, Any] = {}
        if case.startswith("expired"):
            claims["exp"] = now - int(case.split()[1])
        elif case == "not valid for 90 s":
            claims["nbf"] = now + 90
        elif case == "unknown kid":
            header["kid"] = "not-a-key-id"
        elif case == "other issuer":
            claims["iss"] = "https://elsewhere.example"
        elif case == "pod uid":
            ref["pod"]["uid"] = str(uuid.uuid4())
        elif case == "serviceaccount uid":
            ref["serviceaccount"]["uid"] = str(uuid.uuid4())
        elif case == "no exp":
            del claims["exp"]
        token = s.forge(claims, header)
        if case == "bad signature":
            head, payload, sig = token.split(".")
            token = f"{head}.{payload}.{sig[:-6]}AAAAAA"
        return s.review(token, [CP_AUDIENCE])

    real, fake = both(sides, ask)
    assert_same(real, fake, "shape")
    assert without_uids(review_status(fake)) == without_uids(review_status(real))


@pytest.mark.parametrize(
    "case", ["empty token", "no spec", "another kind", "another version", "not JSON"]
)
def test_tokenreview_bodies_that_are_refused(sides: tuple[Side, Side], case: str) -> None:
    def ask(s: Side) -> Answer:
        if case == "not JSON":
            return s.call("POST", TR, raw=b"token", headers={"Content-Type": "text/plain"})
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": ""},
        }
        if case == "no spec":
            del body["spec"]
        elif case == "another kind":
            body.update(kind="Pod", spec={"token": "x"})
        elif case == "another version":
            body.update(apiVersion="authentication.k8s.io/v1beta1", spec={"token": "x"})
        return s.call("POST", TR, body=body)

    assert_same(*both(sides, ask))


# -- object reads ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [f"/api/v1/namespaces/{NS}", f"/api/v1/namespaces/{NS}/serviceaccounts/{NOPERMS}"],
)
def test_objects_read_back(sides: tuple[Side, Side], path: str) -> None:
    real, fake = both(sides, lambda s: s.call("GET", path))
    assert (fake.status, fake.media, fake.cache_control) == (200, real.media, real.cache_control)
    assert real.status == 200
    assert not part_of(fake.body, real.body), part_of(fake.body, real.body)
    for key in ("kind", "apiVersion"):
        assert fake.body[key] == real.body[key]
    meta_r, meta_f = real.body["metadata"], fake.body["metadata"]
    assert meta_f["name"] == meta_r["name"]
    assert meta_f.get("labels") == meta_r.get("labels")
    for key in ("uid", "resourceVersion", "creationTimestamp"):
        assert isinstance(meta_r[key], str) and isinstance(meta_f[key], str)


def test_a_pod_read_back(sides: tuple[Side, Side]) -> None:
    path = f"/api/v1/namespaces/{NS}/pods/{READ_POD}"
    real, fake = both(sides, lambda s: s.call("GET", path))
    assert real.status == 200
    assert (fake.status, fake.media, fake.cache_control) == (200, real.media, real.cache_control)
    body_f = json.loads(json.dumps(fake.body))
    # set by a kubelet (the fake's pods run); this cluster has none: its pods are Pending
    assert body_f["status"].pop("startTime") and real.body["status"]["phase"] == "Pending"
    assert not part_of(body_f, real.body), part_of(body_f, real.body)
    assert fake.body["spec"]["nodeName"] == NODE == real.body["spec"]["nodeName"]
    assert fake.body["spec"]["serviceAccountName"] == real.body["spec"]["serviceAccountName"]


def test_a_pod_held_by_a_finalizer_read_back(sides: tuple[Side, Side]) -> None:
    """Deleted, but a finalizer holds it: still read back, with its deletionTimestamp (which
    the CP keeps: tokens bound to it stop authenticating 60 s later), a grace period of 0 and
    the finalizer, on both."""
    for side in sides:
        side.hold_pod(HELD_POD)
    try:
        path = f"/api/v1/namespaces/{NS}/pods/{HELD_POD}"
        real, fake = both(sides, lambda s: s.call("GET", path))
        assert real.status == 200
        assert (fake.status, fake.media, fake.cache_control) == (
            200,
            real.media,
            real.cache_control,
        )
        body_f = json.loads(json.dumps(fake.body))
        assert body_f["status"].pop("startTime")  # a kubelet's (see test_a_pod_read_back)
        assert not part_of(body_f, real.body), part_of(body_f, real.body)
        meta_r, meta_f = real.body["metadata"], fake.body["metadata"]
        for key in ("deletionGracePeriodSeconds", "finalizers"):
            assert meta_f[key] == meta_r[key], key
        stamps = [meta["deletionTimestamp"] for meta in (meta_r, meta_f)]
        assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", t) for t in stamps), stamps
    finally:
        for side in sides:
            side.release_pod(HELD_POD)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/namespaces/nope",
        f"/api/v1/namespaces/{NS}/serviceaccounts/nope",
        f"/api/v1/namespaces/{NS}/pods/nope",
        "/api/v1/namespaces/nope/pods/nope",
    ],
)
def test_objects_not_found(sides: tuple[Side, Side], path: str) -> None:
    assert_same(*both(sides, lambda s: s.call("GET", path)))


# -- who may: 401, 403, and what comes after authorization -----------------------------------


@pytest.mark.parametrize(
    ("who", "method", "path"),
    [
        ("unknown", "GET", f"/api/v1/namespaces/{NS}"),
        ("anonymous", "GET", f"/api/v1/namespaces/{NS}"),
        ("anonymous", "GET", "/openid/v1/jwks"),
        ("noperms", "GET", f"/api/v1/namespaces/{NS}"),
        ("noperms", "GET", f"/api/v1/namespaces/{NS}/pods/{POD}"),
        ("noperms", "GET", f"/api/v1/namespaces/{NS}/serviceaccounts/{SA}"),
        ("noperms", "POST", TR),
        ("cp", "GET", TR),
        ("cp", "DELETE", TR),
        ("cp", "GET", f"/api/v1/namespaces/{NS}/unknowns/x"),
        ("cp", "GET", "/nothing/here"),
        ("cp", "DELETE", f"/api/v1/namespaces/{NS}/serviceaccounts/{SA}/token"),
    ],
)
def test_refused_callers(sides: tuple[Side, Side], who: str, method: str, path: str) -> None:
    body = None
    if method == "POST":
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": "x"},
        }
    assert_same(*both(sides, lambda s: s.call(method, path, who=who, body=body)))


# -- discovery, keys, permission self-checks --------------------------------------------------


def test_issuer_discovery(sides: tuple[Side, Side]) -> None:
    real, fake = both(sides, lambda s: s.call("GET", "/.well-known/openid-configuration"))
    assert_same(real, fake, "shape")
    assert fake.body["issuer"] == real.body["issuer"] == ISSUER
    for s, a in zip(sides, (real, fake), strict=True):
        assert a.body["jwks_uri"] == f"{s.url}/openid/v1/jwks"


@pytest.mark.parametrize(
    "accept", [None, "application/jwk-set+json", "application/json", "application/*"]
)
def test_the_key_set(sides: tuple[Side, Side], accept: str | None) -> None:
    headers = {"Accept": accept} if accept else {}
    real, fake = both(sides, lambda s: s.call("GET", "/openid/v1/jwks", headers=headers))
    if real.status == 200:
        assert_same(real, fake, "shape")
        assert [sorted(k) for k in fake.body["keys"]] == [sorted(k) for k in real.body["keys"]]
    else:
        assert_same(real, fake)


@pytest.mark.parametrize(
    "attributes",
    [
        {"resourceAttributes": {"verb": "get", "resource": "pods", "namespace": NS}},
        {"resourceAttributes": {"verb": "delete", "resource": "pods", "namespace": NS}},
        {"resourceAttributes": {"verb": "create", "group": "authentication.k8s.io",
                                "resource": "tokenreviews"}},
        {"nonResourceAttributes": {"verb": "get", "path": "/openid/v1/jwks"}},
        {},
    ],
)  # fmt: skip
def test_self_subject_access_reviews(sides: tuple[Side, Side], attributes: dict[str, Any]) -> None:
    body = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": attributes,
    }
    real, fake = both(sides, lambda s: s.call("POST", SSAR, body=body))
    if real.status == 201:
        assert_same(real, fake, "shape")
        assert fake.body["status"]["allowed"] == real.body["status"]["allowed"]
        assert fake.body["spec"] == real.body["spec"]
    else:
        assert_same(real, fake)


# -- TokenRequest -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pod", "secret"])
def test_the_tokens_each_side_issues(sides: tuple[Side, Side], kind: str) -> None:
    real_side, fake_side = sides
    real_tok = real_side.pod_token() if kind == "pod" else real_side.secret_token()
    fake_tok = fake_side.pod_token() if kind == "pod" else fake_side.secret_token()
    (rh, rc), (fh, fc) = claims_of(real_tok), claims_of(fake_tok)
    assert shape(fh) == shape(rh) and fh["alg"] == rh["alg"] == "RS256"
    assert shape(fc) == shape(rc), f"real {rc}\nfake {fc}"
    for key in ("aud", "iss", "sub"):
        assert fc[key] == rc[key]
    assert fc["exp"] - fc["iat"] == rc["exp"] - rc["iat"] == 3600
    bound = {k: v["name"] for k, v in rc["kubernetes.io"].items() if isinstance(v, dict)}
    assert {k: v["name"] for k, v in fc["kubernetes.io"].items() if isinstance(v, dict)} == bound


# -- last: objects deleted ---------------------------------------------------------------------


def test_reviews_after_the_bound_objects_are_gone(sides: tuple[Side, Side]) -> None:
    """A token never reviewed before its pod, Secret or ServiceAccount went is refused at
    once; one reviewed just before stays authenticated (the 10 s token cache), on both."""
    fresh = {s.name: {"pod": s.pod_token(), "secret": s.secret_token()} for s in sides}
    reviewed = {s.name: s.pod_token() for s in sides}
    api = {s.name: s.api_token() for s in sides}
    for s in sides:
        assert review_status(s.review(reviewed[s.name], [CP_AUDIENCE]))["authenticated"]
    for s in sides:
        s.delete("pods", POD)
        s.delete("secrets", SECRET)
    real, fake = both(sides, lambda s: s.review(fresh[s.name]["pod"], [CP_AUDIENCE]))
    assert review_status(fake) == review_status(real)
    assert "invalidated" in review_status(real)["error"]
    real, fake = both(sides, lambda s: s.review(fresh[s.name]["secret"], [CP_AUDIENCE]))
    assert review_status(fake) == review_status(real)
    real, fake = both(sides, lambda s: s.review(reviewed[s.name], [CP_AUDIENCE]))
    assert review_status(real)["authenticated"] is True
    assert without_uids(review_status(fake)) == without_uids(review_status(real))
    for s in sides:
        s.delete("serviceaccounts", SA)
    real, fake = both(sides, lambda s: s.review(api[s.name], None))
    assert review_status(fake) == review_status(real)
    assert "not found" in review_status(real)["error"]
