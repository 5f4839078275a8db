"""Who is calling: the result every authenticator produces, whichever one ran."""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["POD_NAME_KEY", "POD_UID_KEY", "Identity", "session_id_of", "token_hash"]

POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
POD_UID_KEY = "authentication.kubernetes.io/pod-uid"
CREDENTIAL_ID_KEY = "authentication.kubernetes.io/credential-id"
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"
NODE_UID_KEY = "authentication.kubernetes.io/node-uid"
# `extra` keys whose values many callers share (every pod on a node): interned by reviewers
SHARED_EXTRA = frozenset({NODE_NAME_KEY, NODE_UID_KEY})
SA_PREFIX = "system:serviceaccount:"
_SESSION_SA = re.compile(r"session-(.+)-sa")


def token_hash(token: str) -> str:
    """SHA-256 of a token: the only form in which a token is ever used as a key."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def session_id_of(service_account: str | None) -> str | None:
    """``<id>`` from a ServiceAccount named ``session-<id>-sa``; None when absent or empty."""
    if not service_account:
        return None
    m = _SESSION_SA.fullmatch(service_account)
    return m.group(1) if m else None


def _first(extra: Mapping[str, tuple[str, ...]], key: str) -> str | None:
    values = extra.get(key) or ()
    return values[0] if values else None


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller: username, groups, extra, and the pod it is bound to."""

    username: str
    uid: str | None = None
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    expires_at: float | None = None  # the presented token's own `exp` (wall clock), if known
    # Monotonic time until which this answer may be reused: the reads it rests on (the pod
    # and ServiceAccount checks) expire then. None: no such limit.
    cache_until: float | None = None
    # Monotonic time until which this answer may stand in while the API server is down (the
    # reads it rests on may, stale-if-error). None: no such limit.
    stale_until: float | None = None

    # Derived once, when the identity is made (every request reads them).
    namespace: str | None = field(init=False, default=None, compare=False)
    """Namespace of a ServiceAccount username, else None."""
    service_account: str | None = field(init=False, default=None, compare=False)
    """ServiceAccount name of a ServiceAccount username, else None."""
    pod_name: str | None = field(init=False, default=None, compare=False)
    """Name of the pod the token is bound to, if any."""
    pod_uid: str | None = field(init=False, default=None, compare=False)
    """UID of the pod the token is bound to, if any."""
    pod_bound: bool = field(init=False, default=False, compare=False)
    """True when the token is bound to a pod (name and uid both present)."""

    def __post_init__(self) -> None:
        parts = _sa_parts(self.username)
        pod_name, pod_uid = _first(self.extra, POD_NAME_KEY), _first(self.extra, POD_UID_KEY)
        derived = object.__setattr__  # frozen: set once, here
        if parts is not None:
            derived(self, "namespace", sys.intern(parts[0]))  # shared by its many callers
            derived(self, "service_account", parts[1])
        derived(self, "pod_name", pod_name)
        derived(self, "pod_uid", pod_uid)
        derived(self, "pod_bound", bool(pod_name and pod_uid))

    @property
    def session_id(self) -> str | None:
        """``<id>`` of a ServiceAccount named ``session-<id>-sa`` (never empty), else None."""
        return session_id_of(self.service_account)

    @property
    def credential_id(self) -> str | None:
        """The token's credential id (``JTI=...``) as the API server reports it."""
        return _first(self.extra, CREDENTIAL_ID_KEY)


def _sa_parts(username: str) -> tuple[str, str] | None:
    """(namespace, name) of ``system:serviceaccount:<namespace>:<name>``, else None."""
    if not username.startswith(SA_PREFIX):
        return None
    rest = username[len(SA_PREFIX) :]
    ns, sep, name = rest.partition(":")
    if not sep or not ns or not name or ":" in name:
        return None
    return ns, name
