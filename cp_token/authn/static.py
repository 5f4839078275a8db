"""Static dev identities (``CP_TOKEN_AUTHN=static``): a file maps tokens to usernames.

File format: ``{"identities": [{"token": "...", "username": "system:serviceaccount:NS:NAME",
"extra": {"authentication.kubernetes.io/pod-name": ["..."], ...}}]}``. Tokens are kept only
as SHA-256 hashes in memory.
"""

from __future__ import annotations

import json

from cp_token.errors import Unauthenticated
from cp_token.identity import Identity, token_hash
from cp_token.runtime.filewatch import WatchedFile

__all__ = ["StaticReviewer", "parse_identities"]


def parse_identities(raw: bytes) -> dict[str, Identity]:
    """Parse the identities file into {token hash: Identity}; raises ValueError."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    items = doc.get("identities") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise ValueError('expected {"identities": [...]}')
    out: dict[str, Identity] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"identities[{i}] is not an object")
        token, username = item.get("token"), item.get("username")
        if not isinstance(token, str) or not token or not isinstance(username, str):
            raise ValueError(f"identities[{i}] needs a non-empty token and a username")
        extra_raw = item.get("extra") or {}
        if not isinstance(extra_raw, dict):
            raise ValueError(f"identities[{i}].extra is not an object")
        extra = {
            str(k): tuple(str(x) for x in (v if isinstance(v, list) else [v]))
            for k, v in extra_raw.items()
        }
        groups = item.get("groups") or []
        out[token_hash(token)] = Identity(
            username=username,
            uid=item.get("uid"),
            groups=tuple(str(g) for g in groups) if isinstance(groups, list) else (),
            extra=extra,
        )
    return out


class StaticReviewer:
    """Looks a token up in the identities file (re-read when it changes)."""

    def __init__(self, identities: WatchedFile[dict[str, Identity]]) -> None:
        self._identities = identities

    async def aclose(self) -> None:
        """Nothing to close."""

    async def review(self, token: str) -> Identity:
        """The identity configured for this token, or Unauthenticated."""
        # Keyed by hash: the lookup compares digests, never the secret itself.
        identity = self._identities.value.get(token_hash(token))
        if identity is not None:
            return identity
        raise Unauthenticated("unknown token", reason="not_authenticated")
