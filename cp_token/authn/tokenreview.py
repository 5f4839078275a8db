"""Authentication by Kubernetes TokenReview (``CP_TOKEN_AUTHN=tokenreview``).

The API server's answer alone is not enough for revocation: kube-apiserver caches a successful
token authentication for 10 s (its token authenticator's success cache, not configurable), so
a TokenReview keeps saying "authenticated" for up to 10 s after the bound pod is deleted, and
the CP's review cache would add its own TTL to that. So for a ServiceAccount identity the CP
also reads the ServiceAccount and, for a pod-bound one, the pod, through the object cache the
``jwks`` authenticator and the policy use, and applies the API server's own rule to what it
reads (:mod:`cp_token.authn.liveness`); the review is then reused only while those reads are
(``Identity.cache_until``): caches never stack.

The two reads go together, once the TokenReview has vouched for the token: a cold review of a
new pod costs the TokenReview and one read's time, as before (the TokenReview, then the
policy's ServiceAccount read, which now finds it cached); a running session's refreshes find
them cached. When a read fails (the API server shedding load, down), the TokenReview's answer
is kept for the retry, for as long as kube-apiserver would answer it from its own success cache
(10 s from the call; never past the token's ``exp``): the retry costs the reads alone. They are
not sent beside the TokenReview: measured against a real API server
shedding load (tests/cluster/test_priority_fairness.py), reads sent blind beside a TokenReview
that got 429 went out after the 429 had been answered, and a refused token cost two reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from typing import Any

from cp_token.authn.cache import identity_size
from cp_token.authn.liveness import check_live, proof_bounds
from cp_token.authn.precheck import UnverifiedJWT, decode_unverified
from cp_token.errors import Unauthenticated, Unavailable
from cp_token.identity import SHARED_EXTRA, Identity, token_hash
from cp_token.kube.client import KubeClient, KubeDown, KubeForbidden, KubeUnavailable
from cp_token.kube.objects import Cached, ObjectCache
from cp_token.runtime.bounded import BoundedCache, bounded_tlru
from cp_token.runtime.clock import Clock

__all__ = ["TokenReviewer", "identity_from_user"]

Reads = tuple[Cached, Cached | None]  # the ServiceAccount read, the pod read (None: no pod)

log = logging.getLogger(__name__)

# kube-apiserver's token success cache (pkg/kubeapiserver/options/authentication.go,
# TokenSuccessCacheTTL): for this long after a TokenReview vouched for a token, asking again
# gets the same answer from the API server's cache.
VOUCHED_TTL = 10.0
MAX_VOUCHED = 4096  # TokenReview answers kept for a retry after a failed read
MAX_VOUCHED_BYTES = 8 * 1024 * 1024


FORBIDDEN_HINT = (
    "the CP's ServiceAccount may not create tokenreviews.authentication.k8s.io "
    "(grant it in a ClusterRole, or set CP_TOKEN_AUTHN=jwks, which needs no cluster-scoped "
    "permission)"
)


def identity_from_user(user: dict[str, Any], expires_at: float | None) -> Identity:
    """Build an Identity from a TokenReview ``status.user`` object.

    Group names, ``extra`` keys and node values repeat from one caller to the next: they are
    interned, so the review cache holds one copy of each, not one per identity.
    """
    extra_raw = user.get("extra") or {}
    extra: dict[str, tuple[str, ...]] = {}
    if isinstance(extra_raw, dict):
        for k, v in extra_raw.items():
            key = sys.intern(str(k))
            shared = key in SHARED_EXTRA  # a node's: the same for all its pods
            if isinstance(v, list):
                values = tuple(str(x) for x in v)
                extra[key] = tuple(sys.intern(x) for x in values) if shared else values
            elif isinstance(v, str):
                extra[key] = (sys.intern(v) if shared else v,)
    groups = user.get("groups") or []
    return Identity(
        username=str(user.get("username") or ""),
        uid=str(user["uid"]) if user.get("uid") else None,
        groups=tuple(sys.intern(str(g)) for g in groups) if isinstance(groups, list) else (),
        extra=extra,
        expires_at=expires_at,
    )


class TokenReviewer:
    """One TokenReview per call, audiences in ``spec.audiences``, checked in the answer; with
    ``objects``, the ServiceAccount and the bound pod read after it and checked as
    kube-apiserver checks them (see the module's docstring)."""

    def __init__(
        self,
        kube: KubeClient,
        audiences: tuple[str, ...],
        *,
        objects: ObjectCache | None = None,
        clock: Clock | None = None,
    ) -> None:
        if objects is not None and clock is None:
            raise ValueError("the liveness checks need the clock the object cache runs on")
        self._kube = kube
        self._audiences = audiences
        self._objects = objects
        self._clock = clock
        self._forbidden_logged = False
        # token hash -> (the TokenReview's answer, monotonic time it may be reused until):
        # kept only when the reads after it failed
        self._vouched: BoundedCache[str, tuple[Identity, float]] | None = None
        if objects is not None and clock is not None:
            self._vouched = bounded_tlru(
                max_entries=MAX_VOUCHED,
                max_bytes=MAX_VOUCHED_BYTES,
                ttu=lambda _k, v, _now: v[1],
                timer=clock.monotonic,
                estimate=lambda v: identity_size(v[0]),
            )

    async def aclose(self) -> None:
        """Nothing of its own to close (the KubeClient is shared)."""

    async def review(self, token: str) -> Identity:
        """Ask the API server who this token belongs to."""
        try:
            jwt: UnverifiedJWT | None = decode_unverified(token)
        except Unauthenticated:
            jwt = None  # not a JWT: the API server decides; the expiry is unknown
        return await self._review(token, jwt)

    async def review_decoded(self, token: str, jwt: UnverifiedJWT) -> Identity:
        """:meth:`review` of a token already decoded (by the precheck)."""
        return await self._review(token, jwt)

    async def _review(self, token: str, jwt: UnverifiedJWT | None) -> Identity:
        vouched = self._vouched
        if vouched is None:  # no liveness reads: the API server's answer alone
            return await self._ask(token, jwt)
        key = token_hash(token)
        kept = vouched.get(key)
        if kept is None:
            assert self._clock is not None
            started = self._clock.monotonic()
            identity = await self._ask(token, jwt)
            kept = (identity, self._vouched_until(identity, started))
        try:
            alive = await self._alive(kept[0])
        except Unavailable:
            vouched[key] = kept  # the retry costs the reads alone
            raise
        vouched.discard(key)
        return alive

    def _vouched_until(self, identity: Identity, started: float) -> float:
        """When the API server's own cache lets go of its answer (never past ``exp``)."""
        assert self._clock is not None
        until = started + VOUCHED_TTL
        if identity.expires_at is not None:
            until = min(until, self._clock.monotonic() + identity.expires_at - self._clock.time())
        return until

    async def _ask(self, token: str, jwt: UnverifiedJWT | None) -> Identity:
        """The TokenReview's answer as an Identity, or its refusal."""
        try:
            status = await self._kube.token_review(token, self._audiences)
        except KubeForbidden as exc:
            if not self._forbidden_logged:
                log.error("TokenReview refused: %s. %s", exc.reason, FORBIDDEN_HINT)
                self._forbidden_logged = True
            raise Unavailable(
                "the token service cannot review tokens (missing permission)",
                reason="kube_forbidden",
                retry_after=30,
            ) from None
        except KubeUnavailable as exc:
            log.warning("TokenReview failed: %s", exc.reason)
            raise Unavailable(
                "the Kubernetes API is unavailable",
                reason="kube_unavailable",
                retry_after=exc.retry_after if isinstance(exc, KubeDown) else 5,
            ) from None
        if not status.get("authenticated"):
            if status.get("error"):
                log.debug("TokenReview: not authenticated: %s", str(status.get("error"))[:200])
            raise Unauthenticated(
                "token is not authenticated (expired, revoked, wrong audience or unknown)",
                reason="not_authenticated",
            )
        got = status.get("audiences") or []
        if not isinstance(got, list) or not set(got) & set(self._audiences):
            raise Unauthenticated(
                "token was not issued for this service's audience", reason="wrong_audience"
            )
        user = status.get("user")
        if not isinstance(user, dict) or not user.get("username"):
            raise Unavailable(
                "the Kubernetes API returned a review without a user", reason="kube_bad_answer"
            )
        return identity_from_user(user, jwt.exp if jwt is not None else None)

    # --- liveness: the ServiceAccount and the pod, as the API server checks them ----------------

    async def _alive(self, identity: Identity) -> Identity:
        """The identity, once its ServiceAccount and pod are found alive, bounded by those
        reads; refused (401 ``sa_gone`` / ``pod_gone``) when one is gone."""
        if self._objects is None or identity.namespace is None or identity.service_account is None:
            return identity  # not a ServiceAccount: nothing to read (the policy refuses it)
        assert self._clock is not None
        pod_name = identity.pod_name if identity.pod_bound else None
        live_sa, live_pod = await self._reads(
            identity.namespace, identity.service_account, pod_name
        )
        now = self._clock.time()
        check_live(
            live_sa, identity.uid, now, "sa_gone", "the token's ServiceAccount no longer exists"
        )
        reads = [live_sa]
        if pod_name is not None:
            assert live_pod is not None
            check_live(
                live_pod,
                identity.pod_uid,
                now,
                "pod_gone",
                "the pod this token is bound to no longer exists",
            )
            reads.append(live_pod)
        # The review may be reused only while the reads it rests on are: caches never stack.
        fresh, stale = proof_bounds(reads, self._clock, self._objects.stale_ttl)
        return dataclasses.replace(identity, cache_until=fresh, stale_until=stale)

    async def _reads(self, namespace: str, sa_name: str, pod_name: str | None) -> Reads:
        """The ServiceAccount and pod reads (cached ones as they are), the two at once when
        both are due: a review holds at most two calls at once, and the Kubernetes pool is
        sized for that. Both end before the review does, whatever either answers."""
        objects = self._objects
        assert objects is not None
        sa = objects.cached_entry("serviceaccounts", namespace, sa_name)
        pod = None if pod_name is None else objects.cached_entry("pods", namespace, pod_name)
        if sa is None and pod_name is not None and pod is None:
            sa_read, pod_read = await asyncio.gather(
                objects.service_account_entry(namespace, sa_name),
                objects.pod_entry(namespace, pod_name),
                return_exceptions=True,
            )
            if isinstance(sa_read, BaseException):
                raise sa_read
            if isinstance(pod_read, BaseException):
                raise pod_read
            return sa_read, pod_read
        if sa is None:
            sa = await objects.service_account_entry(namespace, sa_name)
        if pod_name is not None and pod is None:
            pod = await objects.pod_entry(namespace, pod_name)
        return sa, pod
