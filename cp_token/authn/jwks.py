"""Authentication without cluster-scoped permission (``CP_TOKEN_AUTHN=jwks``).

The projected ServiceAccount JWT is verified locally against the keys the API server
publishes for its service-account issuer (``/openid/v1/jwks``, read through the same
Kubernetes client as every other call, never from a ``jwks_uri`` elsewhere, so cluster
credentials go nowhere else). Then what TokenReview would prove is proved with namespaced
reads: the ServiceAccount exists with the token's UID, and the bound pod exists with its UID.
Those reads are cached for ``CP_TOKEN_LIVENESS_CACHE_TTL`` seconds: that is how long a deleted
pod's token keeps working.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from cp_token.authn.issuer_keys import ALGORITHMS, IssuerKeys, verifies
from cp_token.authn.precheck import UnverifiedJWT, decode_unverified, numeric_date
from cp_token.clock import Clock
from cp_token.errors import Unauthenticated, Unavailable
from cp_token.identity import (
    CREDENTIAL_ID_KEY,
    NODE_NAME_KEY,
    NODE_UID_KEY,
    POD_NAME_KEY,
    POD_UID_KEY,
    Identity,
)
from cp_token.kube import KubeClient, KubeError, KubeForbidden, KubeUnavailable
from cp_token.objects import ObjectCache
from cp_token.singleflight import SharedCall

__all__ = ["JwksReviewer"]

log = logging.getLogger(__name__)

LEEWAY = 60.0  # clock skew allowance for exp/nbf, as the API server's own validator allows


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
    return Unavailable("the Kubernetes API is unavailable", reason="kube_unavailable")


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
        alg, kid = unverified.alg, unverified.kid
        if alg not in ALGORITHMS:
            raise _bad("token algorithm is not accepted (RS256 or ES256 only)", "bad_algorithm")
        try:
            keys = await self.keys.lookup(kid, alg)
        except KubeError as exc:
            raise _unavailable(exc, "JWKS fetch") from None
        if not verifies(token, keys, alg):
            raise _bad("token signature does not verify", reason="bad_signature")
        await self._check_claims(unverified)
        return await self._prove_alive(unverified.claims)

    async def _check_claims(self, jwt: UnverifiedJWT) -> None:
        claims = jwt.claims
        issuers = await self._accepted_issuers()
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

    async def _prove_alive(self, claims: dict[str, Any]) -> Identity:
        k8s = claims.get("kubernetes.io")
        if not isinstance(k8s, dict):
            raise _bad("token carries no kubernetes.io claims", reason="malformed")
        ns = k8s.get("namespace")
        sa = k8s.get("serviceaccount") or {}
        pod = k8s.get("pod") or {}
        node = k8s.get("node") or {}
        if not isinstance(ns, str) or not isinstance(sa, dict) or not isinstance(pod, dict):
            raise _bad("token's kubernetes.io claims are malformed", reason="malformed")
        sa_name, sa_uid = sa.get("name"), sa.get("uid")
        if not isinstance(sa_name, str) or not isinstance(sa_uid, str):
            raise _bad("token names no ServiceAccount", reason="malformed")
        username = f"system:serviceaccount:{ns}:{sa_name}"
        if claims.get("sub") != username:
            raise _bad("token subject does not match its ServiceAccount", reason="malformed")

        live_sa = await self._objects.service_account_entry(ns, sa_name)
        if live_sa.uid != sa_uid:
            raise _bad("the token's ServiceAccount no longer exists", reason="sa_gone")
        # The review may be reused only while the reads it rests on are: caches never stack.
        proof_until = live_sa.valid_until
        extra: dict[str, tuple[str, ...]] = {}
        pod_name, pod_uid = pod.get("name"), pod.get("uid")
        if pod:
            if not isinstance(pod_name, str) or not isinstance(pod_uid, str):
                raise _bad("token's pod claim is malformed", reason="malformed")
            live_pod = await self._objects.pod_entry(ns, pod_name)
            if live_pod.uid != pod_uid:
                raise _bad("the pod this token is bound to no longer exists", reason="pod_gone")
            proof_until = min(proof_until, live_pod.valid_until)
            extra[POD_NAME_KEY], extra[POD_UID_KEY] = (pod_name,), (pod_uid,)
        if isinstance(node, dict):
            if isinstance(node.get("name"), str):
                extra[NODE_NAME_KEY] = (sys.intern(node["name"]),)
            if isinstance(node.get("uid"), str):
                extra[NODE_UID_KEY] = (sys.intern(node["uid"]),)
        if isinstance(claims.get("jti"), str):
            extra[CREDENTIAL_ID_KEY] = (f"JTI={claims['jti']}",)
        return Identity(
            username=username,
            uid=sa_uid,
            groups=(
                "system:serviceaccounts",
                sys.intern(f"system:serviceaccounts:{ns}"),  # one copy per namespace
                "system:authenticated",
            ),
            extra=extra,
            expires_at=numeric_date(claims, "exp"),
            cache_until=proof_until,
        )
