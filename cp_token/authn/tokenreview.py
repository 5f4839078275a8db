"""Authentication by Kubernetes TokenReview (``CP_TOKEN_AUTHN=tokenreview``)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from cp_token.authn.precheck import UnverifiedJWT, decode_unverified
from cp_token.errors import Unauthenticated, Unavailable
from cp_token.identity import SHARED_EXTRA, Identity
from cp_token.kube.client import KubeClient, KubeDown, KubeForbidden, KubeUnavailable

__all__ = ["TokenReviewer", "identity_from_user"]

log = logging.getLogger(__name__)


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
    """One TokenReview per call, audiences in ``spec.audiences``, checked in the answer."""

    def __init__(self, kube: KubeClient, audiences: tuple[str, ...]) -> None:
        self._kube = kube
        self._audiences = audiences
        self._forbidden_logged = False

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
