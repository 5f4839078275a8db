"""May this identity have a token? Pure decisions over an Identity and labels.

The label lookups themselves (namespace and ServiceAccount, through the Kubernetes API) live
in :mod:`cp_token.kube.objects`; this module does no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from cp_token.errors import Forbidden
from cp_token.identity import Identity
from cp_token.settings.cp import ALLOWED_SA

__all__ = ["RunnerPolicy", "glob_match"]


@lru_cache(maxsize=64)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """fnmatch syntax (``*``, ``?``, ``[seq]``, ``[!seq]``), except that ``*`` matches ONE or
    more characters: ``session-*-sa`` must never admit ``session--sa`` (an empty session id)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".+")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i + 1 if i < n and pattern[i] == "!" else i
            j = j + 1 if j < n and pattern[j] == "]" else j
            j = pattern.find("]", j)
            if j < 0:
                out.append(re.escape(c))
                continue
            body = pattern[i:j].replace("\\", "\\\\")
            i = j + 1
            if body.startswith("!"):
                body = "^" + body[1:]
            elif body.startswith(("^", "[")):
                body = "\\" + body
            out.append(f"[{body}]")
        else:
            out.append(re.escape(c))
    return re.compile("".join(out), re.DOTALL)


def glob_match(name: str, pattern: str) -> bool:
    """True when ``name`` matches the glob ``pattern`` (``*`` never matches nothing)."""
    return _glob_regex(pattern).fullmatch(name) is not None


def _empty_session_id(identity: Identity) -> bool:
    """A ServiceAccount shaped like ``session-<id>-sa`` whose id is empty (``session--sa``)."""
    sa = identity.service_account or ""
    return sa.startswith("session-") and sa.endswith("-sa") and identity.session_id is None


def _what_id(sa: str) -> str:
    """What is wrong with the session id of a name shaped like ``session-<id>-sa``."""
    return "an empty session id" if len(sa) <= len("session--sa") else "an invalid session id"


def _require_label(
    label: tuple[str, str] | None, labels: Mapping[str, str] | None, what: str, reason: str
) -> None:
    """Forbidden unless ``labels`` (None: the object does not exist) carry ``label``."""
    if label is None:
        return
    key, value = label
    if labels is None or labels.get(key) != value:
        raise Forbidden(f"{what} (needs label {key}={value})", reason=reason)


@dataclass(frozen=True)
class RunnerPolicy:
    """The rules a caller must meet to be treated as a session runner."""

    allowed_sa: str = ALLOWED_SA
    allowed_namespaces: tuple[str, ...] = ("*",)
    require_bound: bool = True
    managed_label: tuple[str, str] | None = None
    namespace_label: tuple[str, str] | None = None

    def check_identity(self, identity: Identity) -> None:
        """Checks that need no lookup: username pattern, namespace, pod binding."""
        ns, sa = identity.namespace, identity.service_account
        if ns is None or sa is None:
            raise Forbidden(
                f"{identity.username} is not a ServiceAccount", reason="not_service_account"
            )
        if _empty_session_id(identity):
            raise Forbidden(
                f"ServiceAccount {identity.username} is not a session runner "
                f"(session-<id>-sa with {_what_id(identity.service_account or '')})",
                reason="sa_not_allowed",
            )
        if not glob_match(identity.username, self.allowed_sa):
            raise Forbidden(
                f"ServiceAccount {identity.username} is not a session runner "
                f"(must match {self.allowed_sa})",
                reason="sa_not_allowed",
            )
        if not any(glob_match(ns, pattern) for pattern in self.allowed_namespaces):
            raise Forbidden(
                f"{identity.username}: namespace {ns} is not allowed",
                reason="namespace_not_allowed",
            )
        if self.require_bound and not identity.pod_bound:
            raise Forbidden(
                f"{identity.username}: token is not bound to a pod "
                "(mount a projected ServiceAccount token)",
                reason="not_pod_bound",
            )

    @property
    def needs_labels(self) -> bool:
        """True when a label lookup is required."""
        return self.managed_label is not None or self.namespace_label is not None

    def check_labels(
        self,
        identity: Identity,
        namespace_labels: Mapping[str, str] | None,
        sa_labels: Mapping[str, str] | None,
    ) -> None:
        """Namespace and ServiceAccount must carry the managed labels (None = not found)."""
        _require_label(
            self.namespace_label,
            namespace_labels,
            f"{identity.username}: namespace {identity.namespace} is not managed",
            "namespace_not_managed",
        )
        _require_label(
            self.managed_label,
            sa_labels,
            f"ServiceAccount {identity.username} is not managed",
            "sa_not_managed",
        )
