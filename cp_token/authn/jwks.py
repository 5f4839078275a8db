"""Authentication without cluster-scoped permission (``CP_TOKEN_AUTHN=jwks``).

The projected ServiceAccount JWT is verified locally against the keys the API server
publishes for its service-account issuer (``/openid/v1/jwks``, read through the same
Kubernetes client as every other call, never from a ``jwks_uri`` elsewhere, so cluster
credentials go nowhere else). Then what TokenReview would prove is proved with namespaced
reads: the ServiceAccount exists with the token's UID, and the bound pod exists with its UID,
neither deleted more than 60 s ago (:mod:`cp_token.authn.liveness`, claims.go's rule). Those
reads are cached for ``CP_TOKEN_LIVENESS_CACHE_TTL`` seconds: that is how long a deleted pod's
token keeps working.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

from cp_token.authn.issuer_keys import (
    ALGORITHM_NAMES,
    ALGORITHMS,
    IssuerKeys,
    unknown_key,
    verifies,
)
from cp_token.authn.liveness import check_live, object_names, proof_bounds
from cp_token.authn.precheck import EXP_LEEWAY, UnverifiedJWT, decode_unverified, numeric_date
from cp_token.errors import Unauthenticated, Unavailable
from cp_token.identity import (
    CREDENTIAL_ID_KEY,
    NODE_NAME_KEY,
    NODE_UID_KEY,
    POD_NAME_KEY,
    POD_UID_KEY,
    Identity,
)
from cp_token.kube.client import KubeClient, KubeDown, KubeError, KubeForbidden, KubeUnavailable
from cp_token.kube.objects import Cached, ObjectCache
from cp_token.runtime.clock import Clock
from cp_token.runtime.singleflight import SharedCall

__all__ = ["JwksReviewer"]

log = logging.getLogger(__name__)

# Clock-skew allowance for exp/nbf, as the API server's own: k8s.io/kubernetes
# pkg/serviceaccount/claims.go validates with go-jose's Claims.Validate, which applies
# jwt.DefaultLeeway (1 minute), so kube-apiserver accepts a ServiceAccount token up to 60 s
# past its exp. The precheck uses the same allowance.
LEEWAY = EXP_LEEWAY


def _bad(description: str, reason: str = "not_authenticated") -> Unauthenticated:
    return Unauthenticated(description, reason=reason)


def _unavailable(exc: KubeError, what: str) -> Unavailable:
    if isinstance(exc, KubeForbidden):
        log.error(
            "%s refused: %s (grant the CP 'get' on it in session namespaces)", what, exc.reason
        )
        return Unavailable(
            "the token service cannot verify tokens (missing permission)",
            reason="kube_forbidden",
            retry_after=30,
        )
    log.warning("%s failed: %s", what, exc.reason)
    retry_after = exc.retry_after if isinstance(exc, KubeDown) else 5.0
    return Unavailable(
        "the Kubernetes API is unavailable", reason="kube_unavailable", retry_after=retry_after
    )


class JwksReviewer:
    """Verifies ServiceAccount JWTs locally, then checks the SA and pod still exist."""

    def __init__(
        self,
        kube: KubeClient,
        objects: ObjectCache,
        *,
        clock: Clock,
        audiences: tuple[str, ...],
        issuers: tuple[str, ...] = (),
        keys: IssuerKeys | None = None,
    ) -> None:
        self._kube = kube
        self._objects = objects
        self._clock = clock
        self._audiences = frozenset(audiences)
        self._issuers: frozenset[str] | None = frozenset(issuers) if issuers else None
        self.keys = keys or IssuerKeys(kube, clock)
        self._discovery: SharedCall[frozenset[str]] = SharedCall()

    @property
    def jwks_fetches(self) -> int:
        """JWKS fetches so far (tests and benchmarks)."""
        return self.keys.fetches

    async def aclose(self) -> None:
        """Cancel background fetches (the KubeClient is shared and closed elsewhere)."""
        self._discovery.cancel()
        await self.keys.aclose()

    # --- issuer ---------------------------------------------------------------------------

    async def _accepted_issuers(self) -> frozenset[str]:
        if self._issuers is not None:
            return self._issuers
        try:
            return await self._discovery.do(self._discover_issuer)
        except KubeError as exc:
            raise _unavailable(exc, "issuer discovery") from None

    async def _discover_issuer(self) -> frozenset[str]:
        doc = await self._kube.get_json("openid-configuration", "/.well-known/openid-configuration")
        issuer = doc.get("issuer")
        if not isinstance(issuer, str) or not issuer:
            raise KubeUnavailable("openid-configuration: no issuer in the discovery document")
        self._issuers = frozenset({issuer})
        log.info("service-account issuer discovered", extra={"fields": {"issuer": issuer}})
        return self._issuers

    # --- verification ----------------------------------------------------------------------

    async def review(self, token: str) -> Identity:
        """Verify the token locally and prove its ServiceAccount and pod still exist."""
        return await self.review_decoded(token, decode_unverified(token))

    async def review_decoded(self, token: str, unverified: UnverifiedJWT) -> Identity:
        """:meth:`review` of a token already decoded (by the precheck)."""
        alg, kid = _algorithm(unverified)
        try:
            keys = await self.keys.lookup(kid, alg)
        except KubeError as exc:
            raise _unavailable(exc, "JWKS fetch") from None
        if not keys and self.keys.unknown(kid):
            raise unknown_key()  # not in a set read after the token came: not remembered
        if not verifies(token, keys, alg):
            raise _bad("token signature does not verify", reason="bad_signature")
        self._check_claims(unverified, await self._accepted_issuers())
        bound = _bound_objects(unverified.claims)
        live_sa = await self._objects.service_account_entry(bound.namespace, bound.sa_name)
        self._check_service_account(bound, live_sa)
        live_pod = None
        if bound.pod_name is not None:
            live_pod = await self._objects.pod_entry(bound.namespace, bound.pod_name)
        return self._identity(unverified.claims, bound, live_sa, live_pod)

    def review_ready(self, token: str, unverified: UnverifiedJWT) -> Identity | None:
        """:meth:`review_decoded`'s answer when all it rests on is at hand (the issuer keys
        and issuer known, the ServiceAccount and pod reads cached), without awaiting
        anything; None when it would have to ask the API server. The same checks in the
        same order, so the same answer: most cold reviews of a running session take this
        path (its pod was read for an earlier token)."""
        alg, kid = _algorithm(unverified)
        keys, issuers = self.keys.known(kid, alg), self._issuers
        if keys is None or issuers is None:
            return None
        names = object_names(unverified.claims)
        if names is None:
            return None  # malformed: the full review says how
        namespace, sa_name, pod_name = names
        live_sa = self._objects.cached_entry("serviceaccounts", namespace, sa_name)
        live_pod = (
            None if pod_name is None else self._objects.cached_entry("pods", namespace, pod_name)
        )
        if live_sa is None or (pod_name is not None and live_pod is None):
            return None
        if not verifies(token, keys, alg):
            raise _bad("token signature does not verify", reason="bad_signature")
        self._check_claims(unverified, issuers)
        bound = _bound_objects(unverified.claims)
        self._check_service_account(bound, live_sa)
        return self._identity(unverified.claims, bound, live_sa, live_pod)

    def _check_service_account(self, bound: _Bound, live_sa: Cached) -> None:
        check_live(
            live_sa,
            bound.sa_uid,
            self._clock.time(),
            "sa_gone",
            "the token's ServiceAccount no longer exists",
        )

    def _check_claims(self, jwt: UnverifiedJWT, issuers: frozenset[str]) -> None:
        claims = jwt.claims
        iss = claims.get("iss")
        if not isinstance(iss, str) or iss not in issuers:
            raise _bad(
                "token was not issued by this cluster's ServiceAccount issuer", "wrong_issuer"
            )
        aud = jwt.audiences
        if not aud or not self._audiences & set(aud):
            raise _bad("token was not issued for this service's audience", "wrong_audience")
        now = self._clock.time()
        exp = numeric_date(claims, "exp")
        if exp is None:
            raise _bad("token has no expiry", reason="malformed")
        if exp + LEEWAY < now:
            raise _bad("token has expired", reason="expired")
        nbf = numeric_date(claims, "nbf")
        if nbf is not None and nbf - LEEWAY > now:
            raise _bad("token is not valid yet", reason="not_yet_valid")

    def _identity(
        self,
        claims: dict[str, Any],
        bound: _Bound,
        live_sa: Cached,
        live_pod: Cached | None,
    ) -> Identity:
        """The identity, once the ServiceAccount matched; refused when the pod is gone."""
        reads = [live_sa]
        extra: dict[str, tuple[str, ...]] = {}
        if bound.pod_name is not None and bound.pod_uid is not None:
            assert live_pod is not None
            check_live(
                live_pod,
                bound.pod_uid,
                self._clock.time(),
                "pod_gone",
                "the pod this token is bound to no longer exists",
            )
            reads.append(live_pod)
            extra[POD_NAME_KEY], extra[POD_UID_KEY] = (bound.pod_name,), (bound.pod_uid,)
        # The review may be reused only while the reads it rests on are: caches never stack.
        proof_until, stale_until = proof_bounds(reads, self._clock, self._objects.stale_ttl)
        node = claims["kubernetes.io"].get("node") or {}
        if isinstance(node, dict):
            if isinstance(node.get("name"), str):
                extra[NODE_NAME_KEY] = (sys.intern(node["name"]),)
            if isinstance(node.get("uid"), str):
                extra[NODE_UID_KEY] = (sys.intern(node["uid"]),)
        if isinstance(claims.get("jti"), str):
            extra[CREDENTIAL_ID_KEY] = (f"JTI={claims['jti']}",)
        return Identity(
            username=bound.username,
            uid=bound.sa_uid,
            groups=(
                "system:serviceaccounts",
                sys.intern(f"system:serviceaccounts:{bound.namespace}"),  # one per namespace
                "system:authenticated",
            ),
            extra=extra,
            expires_at=numeric_date(claims, "exp"),
            cache_until=proof_until,
            stale_until=stale_until,
        )


@dataclass(frozen=True, slots=True)
class _Bound:
    """The objects a token names in its ``kubernetes.io`` claims."""

    namespace: str
    sa_name: str
    sa_uid: str
    username: str
    pod_name: str | None = None
    pod_uid: str | None = None


def _algorithm(unverified: UnverifiedJWT) -> tuple[str, str | None]:
    alg = unverified.alg
    if alg not in ALGORITHMS:
        raise _bad(f"token algorithm is not accepted ({ALGORITHM_NAMES} only)", "bad_algorithm")
    return alg, unverified.kid


def _bound_objects(claims: dict[str, Any]) -> _Bound:
    """The token's namespace, ServiceAccount and pod; refused when malformed."""
    k8s = claims.get("kubernetes.io")
    if not isinstance(k8s, dict):
        raise _bad("token carries no kubernetes.io claims", reason="malformed")
    ns = k8s.get("namespace")
    sa = k8s.get("serviceaccount") or {}
    pod = k8s.get("pod") or {}
    if not isinstance(ns, str) or not isinstance(sa, dict) or not isinstance(pod, dict):
        raise _bad("token's kubernetes.io claims are malformed", reason="malformed")
    sa_name, sa_uid = sa.get("name"), sa.get("uid")
    if not isinstance(sa_name, str) or not isinstance(sa_uid, str):
        raise _bad("token names no ServiceAccount", reason="malformed")
    username = f"system:serviceaccount:{ns}:{sa_name}"
    if claims.get("sub") != username:
        raise _bad("token subject does not match its ServiceAccount", reason="malformed")
    if not pod:
        return _Bound(ns, sa_name, sa_uid, username)
    pod_name, pod_uid = pod.get("name"), pod.get("uid")
    if not isinstance(pod_name, str) or not isinstance(pod_uid, str):
        raise _bad("token's pod claim is malformed", reason="malformed")
    return _Bound(ns, sa_name, sa_uid, username, pod_name, pod_uid)
