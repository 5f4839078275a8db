"""The ``static`` minter: one fixed token for local development (like the old BOT_TOKEN).

A static token that is a JWT has an ``exp``; once less than ``min_ttl`` seconds of it are
left it is not handed out (SPEC: no token with less than ``CP_TOKEN_MIN_TTL`` left): 503
``static_short_lived``, and one error log per token, until the file is replaced (it is
watched) or the variable changed.
"""

from __future__ import annotations

import functools
import logging

from cp_token.authn.precheck import decode_unverified
from cp_token.errors import Unauthenticated, Unavailable
from cp_token.identity import Identity, token_hash
from cp_token.minters import DEFAULT_OPTIONS, IssuedToken, MintOptions
from cp_token.runtime.clock import Clock, SystemClock
from cp_token.runtime.filewatch import WatchedFile

__all__ = ["StaticMinter", "parse_static_token"]

log = logging.getLogger(__name__)


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
    """Hands every caller the configured token, while it has ``min_ttl`` seconds left."""

    def __init__(
        self,
        token: str | None = None,
        file: WatchedFile[str] | None = None,
        *,
        min_ttl: float = 0.0,
        clock: Clock | None = None,
    ) -> None:
        if token is None and file is None:
            raise ValueError("a token or a token file is required")
        self._token = token
        self._file = file
        self._min_ttl = min_ttl
        self._clock = clock or SystemClock()
        self._logged: str | None = None  # the short-lived token already logged (its hash)

    @property
    def problem(self) -> str | None:
        """Never misconfigured once loaded."""
        return None

    async def run(self) -> None:
        """No background work."""

    async def aclose(self) -> None:
        """Nothing to close."""

    async def mint(self, identity: Identity, options: MintOptions = DEFAULT_OPTIONS) -> IssuedToken:
        """The current static token; ``options`` cannot narrow it (returned unchanged).
        Raises :class:`Unavailable` once it has less than ``min_ttl`` seconds left."""
        token = self._file.value if self._file is not None else self._token
        assert token is not None
        expires_at = _expiry(token)
        if expires_at is not None:
            left = expires_at - self._clock.time()
            if left < self._min_ttl:
                self._log_short_lived(token, left)
                raise Unavailable(
                    "the configured static token expires too soon; replace it",
                    reason="static_short_lived",
                    retry_after=30,
                )
        return IssuedToken(token=token, expires_at=expires_at)

    def _log_short_lived(self, token: str, left: float) -> None:
        marker = token_hash(token)
        if self._logged != marker:
            self._logged = marker
            log.error(
                "the static token has less than CP_TOKEN_MIN_TTL left; it is not handed out "
                "until CP_TOKEN_STATIC_TOKEN(_FILE) holds a longer-lived one",
                extra={"fields": {"seconds_left": max(0, int(left)), "min_ttl": self._min_ttl}},
            )
