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

import asyncio
import logging
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, RSAKey

from cp_token.authn.precheck import UnverifiedJWT, decode_unverified
from cp_token.clock import Clock
from cp_token.errors import Unauthenticated, Unavailable
from cp_token.identity import CREDENTIAL_ID_KEY, POD_NAME_KEY, POD_UID_KEY, Identity
from cp_token.kube import KubeClient, KubeForbidden, KubeUnavailable, uid_of
from cp_token.objects import ObjectCache

__all__ = ["JwksReviewer"]

log = logging.getLogger(__name__)

ALGORITHMS = frozenset({"RS256", "ES256"})  # what API servers sign ServiceAccount tokens with
KEY_TYPES = {"RS256": "RSA", "ES256": "EC"}
LEEWAY = 60.0  # clock skew allowance for exp/nbf, as the API server's own validator allows
REFETCH_INTERVAL = 10.0  # at most one JWKS fetch per window, however many unknown kids arrive
KEYS_MAX_AGE = 300.0  # re-read the key set this often even when every kid is known
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"
NODE_UID_KEY = "authentication.kubernetes.io/node-uid"

Key = ECKey | RSAKey


def _bad(description: str, reason: str = "not_authenticated") -> Unauthenticated:
    return Unauthenticated(description, reason=reason)


def _unavailable(exc: KubeUnavailable | KubeForbidden, what: str) -> Unavailable:
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
        refetch_interval: float = REFETCH_INTERVAL,
    ) -> None:
        self._kube = kube
        self._objects = objects
        self._clock = clock
        self._audiences = frozenset(audiences)
        self._issuers: frozenset[str] | None = frozenset(issuers) if issuers else None
        self._refetch_interval = refetch_interval
        self._keys: dict[str, Key] = {}
        self._unnamed: list[Key] = []
        self._keys_at = float("-inf")  # monotonic time of the last fetch attempt
        self._keys_loaded = False
        self._key_fetch: asyncio.Task[None] | None = None
        self._issuer_fetch: asyncio.Task[frozenset[str]] | None = None
        self.jwks_fetches = 0

    async def aclose(self) -> None:
        """Cancel background fetches (the KubeClient is shared and closed elsewhere)."""
        for task in (self._key_fetch, self._issuer_fetch):
            if task is not None:
                task.cancel()

    # --- issuer and keys -----------------------------------------------------------------

    async def _accepted_issuers(self) -> frozenset[str]:
        if self._issuers is not None:
            return self._issuers
        if self._issuer_fetch is None:
            self._issuer_fetch = asyncio.create_task(self._discover_issuer())
        task = self._issuer_fetch
        try:
            return await asyncio.shield(task)
        except (KubeUnavailable, KubeForbidden) as exc:
            if self._issuer_fetch is task:
                self._issuer_fetch = None  # retry on the next request
            raise _unavailable(exc, "issuer discovery") from None

    async def _discover_issuer(self) -> frozenset[str]:
        doc = await self._kube.get_json("openid-configuration", "/.well-known/openid-configuration")
        issuer = doc.get("issuer")
        if not isinstance(issuer, str) or not issuer:
            raise KubeUnavailable("openid-configuration: no issuer in the discovery document")
        self._issuers = frozenset({issuer})
        log.info("service-account issuer discovered", extra={"fields": {"issuer": issuer}})
        return self._issuers

    async def _fetch_keys(self) -> None:
        self.jwks_fetches += 1
        doc = await self._kube.get_json("jwks", "/openid/v1/jwks")
        keys: dict[str, Key] = {}
        unnamed: list[Key] = []
        for raw in doc.get("keys") or []:
            if not isinstance(raw, dict) or raw.get("kty") not in ("RSA", "EC"):
                continue
            try:
                key = JWKRegistry.import_key(raw)
            except (JoseError, ValueError, TypeError):
                log.warning("skipping a key of the API server's JWKS that does not load")
                continue
            if not isinstance(key, ECKey | RSAKey):
                continue
            kid = raw.get("kid")
            if isinstance(kid, str) and kid:
                keys[kid] = key
            else:
                unnamed.append(key)
        self._keys, self._unnamed, self._keys_loaded = keys, unnamed, True

    async def _refresh_keys(self, *, wait: bool) -> None:
        """One coalesced fetch, at most one per ``refetch_interval`` (1 s while none loaded)."""
        now = self._clock.monotonic()
        interval = self._refetch_interval if self._keys_loaded else min(1.0, self._refetch_interval)
        if self._key_fetch is None and now - self._keys_at >= interval:
            self._keys_at = now
            self._key_fetch = asyncio.create_task(self._fetch_keys())
            self._key_fetch.add_done_callback(self._key_fetch_done)
        task = self._key_fetch
        if task is None and wait and not self._keys_loaded:
            raise Unavailable(
                "the API server's signing keys are not available yet", reason="kube_unavailable"
            )
        if task is None or not wait:
            return
        try:
            await asyncio.shield(task)
        except (KubeUnavailable, KubeForbidden) as exc:
            if not self._keys_loaded:
                raise _unavailable(exc, "JWKS fetch") from None
            log.warning("JWKS refresh failed, keeping known keys: %s", exc.reason)

    def _key_fetch_done(self, task: asyncio.Task[None]) -> None:
        self._key_fetch = None
        if not task.cancelled() and task.exception() is not None:
            task.exception()  # retrieved; waiters report it

    async def _candidates(self, kid: str | None, alg: str) -> list[Key]:
        if not self._keys_loaded:
            await self._refresh_keys(wait=True)
        elif self._clock.monotonic() - self._keys_at >= KEYS_MAX_AGE:
            await self._refresh_keys(wait=False)  # periodic, in the background
        if kid is not None:
            key = self._keys.get(kid)
            if key is None:
                await self._refresh_keys(wait=True)  # rotation on the API server
                key = self._keys.get(kid)
            return [key] if key is not None else []
        kty = KEY_TYPES[alg]
        return [k for k in [*self._keys.values(), *self._unnamed] if k.key_type == kty]

    # --- verification ----------------------------------------------------------------------

    async def review(self, token: str) -> Identity:
        """Verify the token locally and prove its ServiceAccount and pod still exist."""
        unverified = decode_unverified(token)
        alg = unverified.header.get("alg")
        if alg not in ALGORITHMS:
            raise _bad(f"token algorithm {alg!r} is not accepted", reason="bad_algorithm")
        kid = unverified.header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _bad("malformed token: kid is not a string", reason="malformed")
        keys = await self._candidates(kid, str(alg))
        if not any(self._verifies(token, key, str(alg)) for key in keys):
            raise _bad("token signature does not verify", reason="bad_signature")
        claims = unverified.claims
        await self._check_claims(unverified)
        return await self._prove_alive(claims)

    @staticmethod
    def _verifies(token: str, key: Key, alg: str) -> bool:
        if key.key_type != KEY_TYPES[alg]:
            return False
        try:
            jws.deserialize_compact(token, key, algorithms=[alg])
        except (JoseError, ValueError, TypeError):
            return False
        return True

    async def _check_claims(self, jwt: UnverifiedJWT) -> None:
        claims = jwt.claims
        issuers = await self._accepted_issuers()
        if claims.get("iss") not in issuers:
            raise _bad(
                "token was not issued by this cluster's ServiceAccount issuer", "wrong_issuer"
            )
        aud = jwt.audiences
        if not aud or not self._audiences & set(aud):
            raise _bad("token was not issued for this service's audience", "wrong_audience")
        now = self._clock.time()
        exp = jwt.exp
        if exp is None:
            raise _bad("token has no expiry", reason="malformed")
        if exp + LEEWAY < now:
            raise _bad("token has expired", reason="expired")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf - LEEWAY > now:
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

        live_sa = await self._uid("serviceaccount", ns, sa_name)
        if live_sa != sa_uid:
            raise _bad("the token's ServiceAccount no longer exists", reason="sa_gone")
        extra: dict[str, tuple[str, ...]] = {}
        pod_name, pod_uid = pod.get("name"), pod.get("uid")
        if pod:
            if not isinstance(pod_name, str) or not isinstance(pod_uid, str):
                raise _bad("token's pod claim is malformed", reason="malformed")
            live_pod = await self._uid("pod", ns, pod_name)
            if live_pod != pod_uid:
                raise _bad("the pod this token is bound to no longer exists", reason="pod_gone")
            extra[POD_NAME_KEY], extra[POD_UID_KEY] = (pod_name,), (pod_uid,)
        if isinstance(node, dict):
            if isinstance(node.get("name"), str):
                extra[NODE_NAME_KEY] = (node["name"],)
            if isinstance(node.get("uid"), str):
                extra[NODE_UID_KEY] = (node["uid"],)
        if isinstance(claims.get("jti"), str):
            extra[CREDENTIAL_ID_KEY] = (f"JTI={claims['jti']}",)
        exp = claims.get("exp")
        return Identity(
            username=username,
            uid=sa_uid,
            groups=(
                "system:serviceaccounts",
                f"system:serviceaccounts:{ns}",
                "system:authenticated",
            ),
            extra=extra,
            expires_at=float(exp) if isinstance(exp, int | float) else None,
        )

    async def _uid(self, kind: str, namespace: str, name: str) -> str | None:
        """The live object's UID (None if it does not exist), from the shared object cache."""
        if kind == "pod":
            return uid_of(await self._objects.pod(namespace, name))
        return uid_of(await self._objects.service_account(namespace, name))
