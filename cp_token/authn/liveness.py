"""Is the object a token is bound to still there? The rule both Kubernetes authenticators
apply to their reads of the ServiceAccount and the pod, as kube-apiserver applies it.

k8s.io/kubernetes pkg/serviceaccount/claims.go (``validator.Validate``, v1.37) refuses a
token when its ServiceAccount, or the pod it is bound to, is missing or has another UID, or
was deleted before ``now - jwt.DefaultLeeway`` (``invalidIfDeletedBefore``): an object whose
``deletionTimestamp`` is set but which a finalizer still holds keeps vouching for its tokens
for 60 s after that timestamp, then no longer (the same rule covers a bound Secret, a Node and
webhook configurations, which no session token names). The comparison is Go's
``Time.Before``: refused once ``deletionTimestamp < now - 60 s``, wall-clock time.

Each read is reused for a while (the object cache), so an answer resting on reads may be
reused only while they may (:func:`proof_bounds`): caches never stack.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cp_token.errors import Unauthenticated
from cp_token.kube.objects import Cached
from cp_token.runtime.clock import Clock

__all__ = ["DELETION_LEEWAY", "check_live", "object_names", "proof_bounds"]

# jwt.DefaultLeeway (go-jose), which claims.go subtracts from now for invalidIfDeletedBefore
DELETION_LEEWAY = 60.0


def check_live(entry: Cached, uid: str | None, now: float, reason: str, description: str) -> None:
    """Refuse (401 ``reason``) unless the object exists with ``uid`` (when one is claimed) and
    its deletion, if any, began no more than :data:`DELETION_LEEWAY` before ``now`` (wall
    clock)."""
    if (
        not entry.exists
        or (uid is not None and entry.uid != uid)
        or (entry.deleted_at is not None and entry.deleted_at < now - DELETION_LEEWAY)
    ):
        raise Unauthenticated(description, reason=reason)


def proof_bounds(reads: Iterable[Cached], clock: Clock, stale_ttl: float) -> tuple[float, float]:
    """(fresh, stale): monotonic times until which an answer resting on ``reads`` may be
    reused, and may stand in while the API server is down (``stale_ttl`` after the oldest
    read, as the object cache keeps its entries); neither past the moment an object being
    deleted stops vouching (its deletion time + :data:`DELETION_LEEWAY`)."""
    fresh = stale = float("inf")
    void_in = float("inf")  # seconds from now
    for read in reads:
        fresh = min(fresh, read.valid_until)
        stale = min(stale, read.fetched_at + stale_ttl)
        if read.deleted_at is not None:
            void_in = min(void_in, read.deleted_at + DELETION_LEEWAY - clock.time())
    if void_in != float("inf"):
        void = clock.monotonic() + void_in
        fresh, stale = min(fresh, void), min(stale, void)
    return fresh, stale


def object_names(claims: dict[str, Any]) -> tuple[str, str, str | None] | None:
    """(namespace, ServiceAccount, pod or None) when a token's ``kubernetes.io`` claims name
    them plainly, else None; a lenient peek at unverified claims (what the API server or the
    ``jwks`` authenticator refuses, it says why)."""
    k8s = claims.get("kubernetes.io")
    if not isinstance(k8s, dict):
        return None
    ns, sa, pod = k8s.get("namespace"), k8s.get("serviceaccount"), k8s.get("pod")
    if not isinstance(ns, str) or not isinstance(sa, dict) or not isinstance(sa.get("name"), str):
        return None
    if not pod:
        return ns, sa["name"], None
    return (
        (ns, sa["name"], pod["name"])
        if isinstance(pod, dict) and isinstance(pod.get("name"), str)
        else None
    )
