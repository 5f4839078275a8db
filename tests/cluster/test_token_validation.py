"""The CP judges a ServiceAccount token as the real API server does, in both authn modes.

Tokens forged with the cluster's own ServiceAccount signing key (``cluster.sa_key``) and the
claims TokenRequest would give a session's pod, varied in time: the real TokenReview accepts a
token up to 60 s past its ``exp`` and 60 s before its ``nbf`` (go-jose's leeway); the CP in
``jwks`` mode verifies locally and must give the same answer (in ``tokenreview`` mode it asks
the API server, past its own pre-check). And a pod whose deletion waits on a finalizer (a
node lost, a controller that holds it): TokenReview refuses its token 60 s after the pod's
``deletionTimestamp``; the CP must too.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from joserfc import jws
from joserfc.jwk import RSAKey

from .cluster import ISSUER, Cluster
from .conftest import AUTHN_MODES, StartCp
from .session import CP_AUDIENCE, CpServer, Injector, Session, make_session, pod_token


def forge(cluster: Cluster, session: Session, **claims: Any) -> str:
    """A token for the session's pod as TokenRequest makes it, signed with the cluster's
    ServiceAccount key; ``claims`` override (``exp=None`` drops one)."""
    key = RSAKey.import_key(cluster.sa_key.read_bytes())
    kid = cluster.signing_kid()
    sa = cluster.get(
        f"/api/v1/namespaces/{session.namespace}/serviceaccounts/{session.service_account}"
    )
    now = int(time.time())
    body: dict[str, Any] = {
        "aud": [CP_AUDIENCE],
        "exp": now + 600,
        "iat": now,
        "iss": ISSUER,
        "jti": str(uuid.uuid4()),
        "kubernetes.io": {
            "namespace": session.namespace,
            "pod": {"name": session.pod, "uid": session.pod_object["metadata"]["uid"]},
            "serviceaccount": {"name": session.service_account, "uid": sa["metadata"]["uid"]},
        },
        "nbf": now,
        "sub": f"system:serviceaccount:{session.namespace}:{session.service_account}",
    }
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jws.serialize_compact(
        {"alg": "RS256", "kid": kid}, json.dumps(body).encode(), key, algorithms=["RS256"]
    )


TIMES = {
    # name: claims relative to now
    "valid": {},
    "expired 10 s ago": {"exp": -10},
    "expired 45 s ago": {"exp": -45},
    "expired 55 s ago": {"exp": -55},
    "expired 75 s ago": {"exp": -75},
    "not valid for 30 s": {"nbf": 30},
    "not valid for 90 s": {"nbf": 90},
    "issued 90 s ahead": {"iat": 90},
}


@pytest.mark.parametrize("case", list(TIMES))
def test_the_cp_and_tokenreview_agree_on_time_claims(
    cluster: Cluster, cp: CpServer, case: str
) -> None:
    session = make_session(cluster, f"time{cp.mode[:4]}{list(TIMES).index(case)}")
    now = int(time.time())
    token = forge(cluster, session, **{k: now + v for k, v in TIMES[case].items()})
    review = cluster.token_review(token, [CP_AUDIENCE])["status"]
    resp = cp.get_token(token)
    expected = 200 if review.get("authenticated") else 401
    assert resp.status_code == expected, (
        f"{cp.mode}: TokenReview says {review.get('authenticated') or review.get('error')}, "
        f"the CP answered {resp.status_code} {resp.text}"
    )


def test_the_api_server_leeway_is_60_s(cluster: Cluster, injector: Injector) -> None:
    """What the comparison above rests on, measured: accepted 55 s past exp, not 65 s."""
    session = make_session(cluster, "leeway")
    now = int(time.time())
    ok = cluster.token_review(forge(cluster, session, exp=now - 55), [CP_AUDIENCE])["status"]
    late = cluster.token_review(forge(cluster, session, exp=now - 65), [CP_AUDIENCE])["status"]
    assert ok.get("authenticated") is True
    assert not late.get("authenticated") and "expired" in late["error"]


def test_a_pod_held_by_a_finalizer_after_its_deletion(
    cluster: Cluster, injector: Injector, start_cp: StartCp
) -> None:
    """Deleted (``deletionTimestamp`` set) but kept by a finalizer: TokenReview authenticates
    its token for 60 s more, then says "invalidated"; a CP in either mode must follow within
    its cache TTL (short here), although the pod object still exists."""
    ttl = {"CP_TOKEN_REVIEW_CACHE_TTL": "2", "CP_TOKEN_LIVENESS_CACHE_TTL": "2"}
    cps = {mode: start_cp(mode, extra=ttl) for mode in AUTHN_MODES}
    session = make_session(cluster, "finalizer")
    path = f"/api/v1/namespaces/{session.namespace}/pods/{session.pod}"
    held = cluster.request(
        "PATCH", path, body={"metadata": {"finalizers": ["example.com/hold"]}}, patch="merge"
    )
    assert held.status_code == 200, held.text
    token = pod_token(cluster, session)
    try:
        for mode, cp in cps.items():
            assert cp.get_token(token).status_code == 200, mode
        deleted = cluster.request("DELETE", path + "?gracePeriodSeconds=0")
        assert deleted.status_code == 200 and deleted.json()["metadata"]["deletionTimestamp"]
        # TokenReview: authenticated until deletionTimestamp + 60 s (plus its 10 s cache)
        start = time.monotonic()
        while cluster.token_review(token, [CP_AUDIENCE])["status"].get("authenticated"):
            assert time.monotonic() - start < 80, "TokenReview never refused the token"
            time.sleep(1)
        refused_after = time.monotonic() - start
        assert refused_after >= 55, refused_after
        assert cluster.request("GET", path).status_code == 200, "the pod is still there"
        # the CPs, within their 2 s caches (and a poll)
        time.sleep(3)
        answers = {mode: cp.get_token(token) for mode, cp in cps.items()}
        assert {m: a.status_code for m, a in answers.items()} == dict.fromkeys(AUTHN_MODES, 401), {
            m: a.text for m, a in answers.items()
        }
    finally:
        cluster.request("PATCH", path, body={"metadata": {"finalizers": None}}, patch="merge")
