"""Who is calling: the result every authenticator produces, whichever one ran."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

__all__ = ["POD_NAME_KEY", "POD_UID_KEY", "Identity", "token_hash"]

POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
POD_UID_KEY = "authentication.kubernetes.io/pod-uid"
CREDENTIAL_ID_KEY = "authentication.kubernetes.io/credential-id"
SA_PREFIX = "system:serviceaccount:"


def token_hash(token: str) -> str:
    """SHA-256 of a token: the only form in which a token is ever used as a key."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _first(extra: Mapping[str, tuple[str, ...]], key: str) -> str | None:
    values = extra.get(key) or ()
    return values[0] if values else None


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: username, groups, extra, and the pod it is bound to."""

    username: str
    uid: str | None = None
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    expires_at: float | None = None  # the presented token's own `exp` (wall clock), if known

    @cached_property
    def namespace(self) -> str | None:
        """Namespace of a ServiceAccount username, else None."""
        parts = self._sa_parts
        return parts[0] if parts else None

    @cached_property
    def service_account(self) -> str | None:
        """ServiceAccount name of a ServiceAccount username, else None."""
        parts = self._sa_parts
        return parts[1] if parts else None

    @cached_property
    def pod_name(self) -> str | None:
        """Name of the pod the token is bound to, if any."""
        return _first(self.extra, POD_NAME_KEY)

    @cached_property
    def pod_uid(self) -> str | None:
        """UID of the pod the token is bound to, if any."""
        return _first(self.extra, POD_UID_KEY)

    @cached_property
    def pod_bound(self) -> bool:
        """True when the token is bound to a pod (name and uid both present)."""
        return bool(self.pod_name and self.pod_uid)

    @property
    def credential_id(self) -> str | None:
        """The token's credential id (``JTI=...``) as the API server reports it."""
        return _first(self.extra, CREDENTIAL_ID_KEY)

    @cached_property
    def _sa_parts(self) -> tuple[str, str] | None:
        if not self.username.startswith(SA_PREFIX):
            return None
        rest = self.username[len(SA_PREFIX) :]
        ns, sep, name = rest.partition(":")
        if not sep or not ns or not name or ":" in name:
            return None
        return ns, name
