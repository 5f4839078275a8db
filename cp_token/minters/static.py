"""The ``static`` minter: one fixed token for local development (like the old BOT_TOKEN)."""

from __future__ import annotations

import functools

from cp_token.authn.precheck import decode_unverified
from cp_token.errors import Unauthenticated
from cp_token.filewatch import WatchedFile
from cp_token.identity import Identity
from cp_token.minters import DEFAULT_OPTIONS, IssuedToken, MintOptions

__all__ = ["StaticMinter", "parse_static_token"]


def parse_static_token(raw: bytes) -> str:
    """The token in a file (surrounding whitespace stripped); raises ValueError if empty."""
    token = raw.decode("utf-8", "replace").strip()
    if not token:
        raise ValueError("the token file is empty")
    return token


@functools.lru_cache(maxsize=4)  # the token changes only when its file does
def _expiry(token: str) -> float | None:
    """A JWT's ``exp``, so even a static token gets an honest expiry when it has one."""
    try:
        return decode_unverified(token).exp
    except Unauthenticated:
        return None


class StaticMinter:
    """Hands every caller the configured token."""

    def __init__(self, token: str | None = None, file: WatchedFile[str] | None = None) -> None:
        if token is None and file is None:
            raise ValueError("a token or a token file is required")
        self._token = token
        self._file = file

    @property
    def problem(self) -> str | None:
        """Never misconfigured once loaded."""
        return None

    async def run(self) -> None:
        """No background work."""

    async def aclose(self) -> None:
        """Nothing to close."""

    async def mint(self, identity: Identity, options: MintOptions = DEFAULT_OPTIONS) -> IssuedToken:
        """The current static token; ``options`` cannot narrow it (returned unchanged)."""
        token = self._file.value if self._file is not None else self._token
        assert token is not None
        return IssuedToken(token=token, expires_at=_expiry(token))
