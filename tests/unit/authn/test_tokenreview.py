"""TokenReview authentication: the API server's answer, and the pod and ServiceAccount read
beside it, so a deleted pod's token is refused within the pod read's TTL, not the review
cache's plus the API server's own 10 s (found by the cluster tier:
tests/cluster/test_revocation.py). In-process: the review cache in front, the object cache,
an in-memory Kubernetes client, the fake clock."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import pytest

from cp_token.authn.cache import CachedAuthenticator
from cp_token.authn.tokenreview import TokenReviewer
from cp_token.errors import Unauthenticated, Unavailable
from cp_token.kube.client import KubeDown
from cp_token.kube.objects import ObjectCache
from cp_token.runtime.clock import FakeClock, rfc3339
from tests.fakes.kube_memory import MemoryKube, pod_status

NS, SA, POD = "session-ns", "session-abc-sa", "runner-abc"
LIVENESS_TTL, REVIEW_TTL = 10.0, 30.0


def b64(doc: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def token_for(pod: str = POD, jti: str = "1", exp: float | None = None) -> str:
    """A token shaped as TokenRequest makes it (its signature is the API server's business:
    the in-memory review says what it says)."""
    claims = {
        "aud": ["ambient-cp"],
        "exp": int(exp if exp is not None else time.time() + 3600),
        "iss": "https://kubernetes.default.svc",
        "jti": jti,
        "sub": f"system:serviceaccount:{NS}:{SA}",
        "kubernetes.io": {
            "namespace": NS,
            "serviceaccount": {"name": SA, "uid": "sa-uid"},
            "pod": {"name": pod, "uid": "pod-uid"},
        },
    }
    return f"{b64({'alg': 'RS256', 'kid': 'k'})}.{b64(claims)}.c2ln"


class Rig:
    """The CP's authentication as ``tokenreview`` wires it, on an in-memory cluster."""

    def __init__(self) -> None:
        self.clock = FakeClock(start=float(int(time.time())))  # whole seconds, as RFC 3339
        self.kube = MemoryKube()
        self.sa_uid = self.kube.put("serviceaccounts", NS, SA)
        self.pod_uid = self.kube.put("pods", NS, POD)
        self.objects = ObjectCache(
            self.kube,  # type: ignore[arg-type]
            self.clock,
            ttl=LIVENESS_TTL,
            stale_ttl=REVIEW_TTL,
        )
        self.reviewer = TokenReviewer(
            self.kube,  # type: ignore[arg-type]
            ("ambient-cp",),
            objects=self.objects,
            clock=self.clock,
        )
        self.authn = CachedAuthenticator(
            self.reviewer,
            clock=self.clock,
            audiences=("ambient-cp",),
            ttl=REVIEW_TTL,
            stale_ttl=REVIEW_TTL,
            upstream=self.kube,
            max_in_flight=8,
        )

    def token(self, pod: str = POD, jti: str = "1") -> str:
        """A token the API server authenticates (for as long as the test says)."""
        token = token_for(pod, jti)
        uid = self.pod_uid if pod == POD else self.kube.objects[("pods", NS, pod)]["metadata"]
        self.kube.reviews[token] = pod_status(
            NS, SA, self.sa_uid, pod, uid if isinstance(uid, str) else uid["uid"]
        )
        return token

    async def refused(self, token: str) -> str:
        with pytest.raises(Unauthenticated) as info:
            await self.authn.authenticate(token)
        return info.value.reason


# --- revocation: the pod read bounds the review ---------------------------------------------


async def test_a_deleted_pods_token_is_refused_when_the_pod_read_expires() -> None:
    """Before: the review cache kept the answer 30 s, on top of the API server's own 10 s
    success cache; now the pod read (10 s) bounds it: caches do not stack."""
    rig = Rig()
    token = rig.token()
    identity = await rig.authn.authenticate(token)
    assert identity.pod_name == POD
    rig.kube.remove("pods", NS, POD)  # the API server still says "authenticated" (its cache)
    rig.clock.advance(LIVENESS_TTL - 0.5)
    assert await rig.authn.authenticate(token) is identity  # reused: the pod read is fresh
    rig.clock.advance(0.5)
    assert await rig.refused(token) == "pod_gone"


async def test_a_pod_of_the_same_name_but_another_uid_is_gone() -> None:
    rig = Rig()
    token = rig.token()
    rig.kube.put("pods", NS, POD)  # recreated: a new uid
    assert await rig.refused(token) == "pod_gone"


async def test_a_deleted_service_account_is_refused_too() -> None:
    rig = Rig()
    token = rig.token()
    rig.kube.remove("serviceaccounts", NS, SA)
    assert await rig.refused(token) == "sa_gone"


async def test_the_two_reads_go_together_after_the_review() -> None:
    """A cold review costs the TokenReview and one read's time: the ServiceAccount and the
    pod are read at once."""
    rig = Rig()
    token = rig.token()
    rig.kube.hold("serviceaccount")
    review = asyncio.create_task(rig.authn.authenticate(token))
    await asyncio.wait_for(rig.kube.began("pod").wait(), timeout=5)  # while the SA read is out
    assert not review.done()
    rig.kube.release("serviceaccount")
    assert (await review).pod_uid == rig.pod_uid
    assert rig.kube.calls == {"tokenreview": 1, "serviceaccount": 1, "pod": 1}


async def test_both_reads_end_before_the_review_does() -> None:
    """A review holds at most its two reads, and none outlives it (the pool is sized for two
    calls per review slot)."""
    rig = Rig()
    token = rig.token()
    rig.kube.hold("serviceaccount")
    rig.kube.hold("pod")
    review = asyncio.create_task(rig.authn.authenticate(token))
    await asyncio.wait_for(rig.kube.began("pod").wait(), timeout=5)
    rig.kube.fail(KubeDown("serviceaccount: Kubernetes API answered 429", 10.0))
    rig.kube.release("serviceaccount")  # fails: nothing read before stands in
    for _ in range(20):
        await asyncio.sleep(0)
    assert not review.done()  # the pod read is still out
    rig.kube.release("pod")
    with pytest.raises(Unavailable):
        await review


async def test_a_running_sessions_next_token_reads_nothing_while_the_reads_are_fresh() -> None:
    rig = Rig()
    await rig.authn.authenticate(rig.token(jti="1"))
    rig.clock.advance(5)
    await rig.authn.authenticate(rig.token(jti="2"))  # a refresh: a new token, same pod
    assert rig.kube.calls == {"tokenreview": 2, "serviceaccount": 1, "pod": 1}
    rig.clock.advance(5)  # the reads expired: read again, once
    await rig.authn.authenticate(rig.token(jti="3"))
    assert rig.kube.calls == {"tokenreview": 3, "serviceaccount": 2, "pod": 2}


async def test_a_retry_after_a_failed_read_costs_the_reads_alone() -> None:
    """The API server shed a read: the pod's retry reuses the TokenReview's answer for the
    10 s kube-apiserver itself would answer it from its cache, and asks only for the reads
    (before, the retry cost a TokenReview again: 440 TokenReviews for 300 pods in
    tests/cluster/test_priority_fairness.py)."""
    rig = Rig()
    token = rig.token()
    rig.kube.fail(KubeDown("pod: Kubernetes API answered 429", 1.0), "pod")
    with pytest.raises(Unavailable):
        await rig.authn.authenticate(token)
    rig.kube.fail(None)
    rig.clock.advance(1)
    assert (await rig.authn.authenticate(token)).pod_uid == rig.pod_uid
    assert rig.kube.calls == {"tokenreview": 1, "serviceaccount": 1, "pod": 2}
    # kept only until the API server's own cache would let go of it
    rig.kube.put("pods", NS, "runner-2")  # never read: no earlier read stands in
    other = rig.token(pod="runner-2")
    rig.kube.fail(KubeDown("pod: Kubernetes API answered 429", 1.0), "pod")
    with pytest.raises(Unavailable):
        await rig.authn.authenticate(other)
    rig.kube.fail(None)
    rig.clock.advance(10)
    await rig.authn.authenticate(other)
    assert rig.kube.calls["tokenreview"] == 3


@pytest.mark.parametrize("answer", ["refused", "429"])
async def test_a_review_the_api_server_does_not_vouch_for_reads_nothing(answer: str) -> None:
    """A token the API server refuses (or a 429) costs it one call, as before: nothing is
    read for it, and nothing goes out after the 429."""
    rig = Rig()
    token = token_for(jti="unknown to the API server")
    if answer == "429":
        token = rig.token()
        rig.kube.fail(KubeDown("tokenreview: Kubernetes API answered 429", 10.0))
    with pytest.raises(Unauthenticated if answer == "refused" else Unavailable):
        await rig.authn.authenticate(token)
    for _ in range(20):
        await asyncio.sleep(0)
    assert rig.kube.calls == {"tokenreview": 1}


async def test_reads_check_what_the_review_vouched_for() -> None:
    """Not a JWT: the reads name what the API server vouched for (the review's user)."""
    rig = Rig()
    opaque = "an-opaque-token"
    rig.kube.reviews[opaque] = pod_status(NS, SA, rig.sa_uid, POD, rig.pod_uid)
    assert (await rig.reviewer.review(opaque)).pod_name == POD
    rig.kube.remove("pods", NS, POD)
    rig.clock.advance(LIVENESS_TTL)
    with pytest.raises(Unauthenticated) as info:
        await rig.reviewer.review(opaque)
    assert info.value.reason == "pod_gone"


# --- a deletion a finalizer holds: 60 s, as kube-apiserver's claims.go ---------------------


@pytest.mark.parametrize(("kind", "reason"), [("pods", "pod_gone"), ("serviceaccounts", "sa_gone")])
async def test_an_object_deleted_more_than_60_s_ago_no_longer_vouches(
    kind: str, reason: str
) -> None:
    rig = Rig()
    token = rig.token()
    name = POD if kind == "pods" else SA
    uid = rig.pod_uid if kind == "pods" else rig.sa_uid
    rig.kube.put(kind, NS, name, uid=uid, deletion=rfc3339(rig.clock.time() - 61))
    assert await rig.refused(token) == reason


async def test_a_review_resting_on_a_terminating_pod_ends_60_s_after_its_deletion() -> None:
    rig = Rig()
    token = rig.token()
    rig.kube.put("pods", NS, POD, uid=rig.pod_uid, deletion=rfc3339(rig.clock.time() - 58))
    identity = await rig.authn.authenticate(token)  # deleted 58 s ago: still vouches
    rig.clock.advance(1.5)
    assert await rig.authn.authenticate(token) is identity
    rig.clock.advance(1)  # 60.5 s after the deletion: the cached review ends with it
    assert await rig.refused(token) == "pod_gone"


# --- the API server down: stale-if-error up to CP_TOKEN_REVIEW_CACHE_TTL ----------------------


async def test_a_review_stands_in_while_the_api_server_is_down() -> None:
    rig = Rig()
    token = rig.token()
    identity = await rig.authn.authenticate(token)
    rig.kube.fail(KubeDown("the Kubernetes API is down", 1.0))
    rig.clock.advance(LIVENESS_TTL + 2)  # past the pod read's TTL: a review is due
    assert await rig.authn.authenticate(token) is identity  # it failed: the API server is down
    assert rig.kube.down and rig.kube.calls["tokenreview"] == 2
    assert await rig.authn.authenticate(token) is identity  # down: at once
    rig.clock.advance(REVIEW_TTL - LIVENESS_TTL - 2.5)
    assert await rig.authn.authenticate(token) is identity
    rig.clock.advance(1)  # past CP_TOKEN_REVIEW_CACHE_TTL since the reads
    with pytest.raises(Unavailable):
        await rig.authn.authenticate(token)


async def test_while_down_a_stale_review_answers_at_once_and_one_review_probes() -> None:
    rig = Rig()
    token = rig.token()
    identity = await rig.authn.authenticate(token)
    rig.clock.advance(LIVENESS_TTL + 1)
    rig.kube.down = True  # a call failed; the next may go (the probe)
    rig.kube.hold("tokenreview")  # the probe hangs
    for _ in range(3):
        assert await asyncio.wait_for(rig.authn.authenticate(token), timeout=1) is identity
    await asyncio.wait_for(rig.kube.began("tokenreview").wait(), timeout=5)
    assert rig.kube.calls["tokenreview"] == 2  # the first review, and one probe
    rig.kube.remove("pods", NS, POD)  # the probe's answer comes: and the pod is gone
    rig.kube.release("tokenreview")
    for _ in range(100):
        if not rig.authn._background:
            break
        await asyncio.sleep(0)
    assert await rig.refused(token) == "pod_gone"


async def test_a_real_refusal_is_not_overruled_by_a_stale_review() -> None:
    rig = Rig()
    token = rig.token()
    await rig.authn.authenticate(token)
    rig.clock.advance(LIVENESS_TTL + 1)
    del rig.kube.reviews[token]  # the API server says no
    assert await rig.refused(token) == "not_authenticated"
    rig.kube.fail(KubeDown("the Kubernetes API is down", 1.0))
    rig.kube.down = True
    assert await rig.refused(token) == "not_authenticated"
