"""``jwks`` authentication's liveness checks: the ServiceAccount and the pod a token names
must exist with its UIDs and not have been deleted more than 60 s ago, as kube-apiserver
judges them (pkg/serviceaccount/claims.go); a pod whose deletion a finalizer holds was served
for as long as it existed (found by the cluster tier:
tests/cluster/test_token_validation.py). In-process: an in-memory Kubernetes client, a real
ES256 signature, the fake clock."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from joserfc import jws
from joserfc.jwk import ECKey

from cp_token.authn.cache import CachedAuthenticator
from cp_token.authn.jwks import JwksReviewer
from cp_token.errors import Unauthenticated
from cp_token.kube.objects import ObjectCache
from cp_token.runtime.clock import FakeClock, rfc3339
from tests.fakes.kube_memory import MemoryKube

NS, SA, POD = "session-ns", "session-abc-sa", "runner-abc"
ISSUER = "https://kubernetes.default.svc"
LIVENESS_TTL = 10.0
KEY = ECKey.generate_key("P-256", private=True)


class Rig:
    """The CP's authentication as ``jwks`` wires it, on an in-memory cluster."""

    def __init__(self) -> None:
        self.clock = FakeClock(start=float(int(time.time())))  # whole seconds, as RFC 3339
        self.kube = MemoryKube()
        self.kube.key_set = {"keys": [{**KEY.as_dict(private=False), "kid": "k1", "use": "sig"}]}
        self.sa_uid = self.kube.put("serviceaccounts", NS, SA)
        self.pod_uid = self.kube.put("pods", NS, POD)
        self.objects = ObjectCache(
            self.kube,  # type: ignore[arg-type]
            self.clock,
            ttl=LIVENESS_TTL,
            stale_ttl=30.0,
        )
        self.reviewer = JwksReviewer(
            self.kube,  # type: ignore[arg-type]
            self.objects,
            clock=self.clock,
            audiences=("ambient-cp",),
            issuers=(ISSUER,),
        )
        self.authn = CachedAuthenticator(
            self.reviewer,
            clock=self.clock,
            audiences=("ambient-cp",),
            ttl=LIVENESS_TTL,
            max_in_flight=8,
        )

    def token(self, jti: str = "1") -> str:
        now = int(self.clock.time())
        claims: dict[str, Any] = {
            "aud": ["ambient-cp"],
            "exp": now + 3600,
            "iat": now,
            "nbf": now,
            "iss": ISSUER,
            "jti": jti,
            "sub": f"system:serviceaccount:{NS}:{SA}",
            "kubernetes.io": {
                "namespace": NS,
                "serviceaccount": {"name": SA, "uid": self.sa_uid},
                "pod": {"name": POD, "uid": self.pod_uid},
            },
        }
        return jws.serialize_compact(
            {"alg": "ES256", "kid": "k1"}, json.dumps(claims), KEY, algorithms=["ES256"]
        )

    def deleted(self, kind: str, ago: float) -> None:
        """The pod or ServiceAccount deleted ``ago`` seconds ago, held by a finalizer."""
        name, uid = (POD, self.pod_uid) if kind == "pods" else (SA, self.sa_uid)
        self.kube.put(kind, NS, name, uid=uid, deletion=rfc3339(self.clock.time() - ago))

    async def refused(self, token: str) -> str:
        with pytest.raises(Unauthenticated) as info:
            await self.authn.authenticate(token)
        return info.value.reason


@pytest.mark.parametrize(("kind", "reason"), [("pods", "pod_gone"), ("serviceaccounts", "sa_gone")])
async def test_an_object_deleted_more_than_60_s_ago_no_longer_vouches(
    kind: str, reason: str
) -> None:
    """Before: a pod (or ServiceAccount) kept by a finalizer vouched for its tokens for as
    long as it existed; kube-apiserver stops 60 s after its deletionTimestamp."""
    rig = Rig()
    rig.deleted(kind, 61)
    assert await rig.refused(rig.token()) == reason


@pytest.mark.parametrize(("kind", "reason"), [("pods", "pod_gone"), ("serviceaccounts", "sa_gone")])
async def test_a_review_resting_on_a_terminating_object_ends_60_s_after_its_deletion(
    kind: str, reason: str
) -> None:
    rig = Rig()
    rig.deleted(kind, 55)
    token = rig.token()
    identity = await rig.authn.authenticate(token)  # 55 s: still vouches
    rig.clock.advance(4.5)
    assert await rig.authn.authenticate(token) is identity
    rig.clock.advance(1)  # 60.5 s after the deletion, the object still there and cached
    assert await rig.refused(token) == reason
    # a new token of the same pod, answered from the cached reads (the ready path): refused
    assert await rig.refused(rig.token(jti="2")) == reason
    assert rig.kube.calls["pod"] == 1 and rig.kube.calls["serviceaccount"] == 1


async def test_a_deletion_exactly_60_s_ago_still_vouches() -> None:
    """claims.go refuses a deletion *before* now - 60 s (Go's Time.Before), not at it."""
    rig = Rig()
    rig.deleted("pods", 60)
    assert (await rig.authn.authenticate(rig.token())).pod_uid == rig.pod_uid


async def test_a_deleted_pods_token_is_refused_when_the_pod_read_expires() -> None:
    rig = Rig()
    token = rig.token()
    await rig.authn.authenticate(token)
    rig.kube.remove("pods", NS, POD)
    rig.clock.advance(LIVENESS_TTL)
    assert await rig.refused(token) == "pod_gone"
