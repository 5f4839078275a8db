"""The held token as the egress routes see it: a bearer to add to a call, or why there is none.

Sealed mode adds the sidecar's token to the pod's outgoing calls (HTTP and gRPC alike)
instead of handing it out. The rules are ``/token``'s, read from the same holder and fetched
through the same refresher (one fetch in flight, shared by every caller): a call with nothing
unexpired held waits for a fetch as ``GET /token`` would, and an upstream's 401 forces a fresh
token as ``POST /token`` would (at most one fetch per ``recent_window``, 5 s).
"""

from __future__ import annotations

import re

from .refresher import Refresher

__all__ = ["HeldBearer", "NoToken"]

# What may follow "Bearer " in a header (RFC 6750's b64token is narrower; the CP's answer is
# not trusted to be either): a token with a space or a line break would rewrite the request.
_SENDABLE = re.compile(r"[\x21-\x7e]+")


class NoToken(Exception):
    """No unexpired token is held and none could be fetched now: answer 503 (or gRPC
    UNAVAILABLE) with ``retry_after`` whole seconds; or, when the CP refused this pod
    (``rejected``: its 401 or 403), relay that refusal as ``GET /token`` does, so a caller
    stops retrying. The message never holds a token."""

    def __init__(
        self, reason: str, retry_after: int, rejected: int | None = None, description: str = ""
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.rejected = rejected
        self.description = description


class HeldBearer:
    """The token to add to an outgoing call, from the sidecar's holder and refresher."""

    def __init__(self, refresher: Refresher, min_ttl: float) -> None:
        self._refresher = refresher
        self._holder = refresher.holder
        self._min_ttl = min_ttl

    async def current(self) -> str:
        """The held token, fetching first when ``GET /token`` would (less than ``min_ttl``
        left, within the backoff rules); raises :class:`NoToken` when none is held."""
        holder = self._holder
        if holder.rejection is not None:
            self._refresher.check_sa_token()  # a rotated SA token is tried at once
        if holder.should_fetch(self._min_ttl):
            await self._refresher.fetch()
        token = holder.current()
        if token is None:
            rejection = holder.rejection
            if rejection is not None:
                raise NoToken(
                    self._why(), holder.retry_after(), rejection.status, rejection.description
                )
            raise NoToken(self._why(), holder.retry_after())
        if not _SENDABLE.fullmatch(token.token):
            raise NoToken("the held token cannot be sent in a header", holder.retry_after())
        return token.token

    async def after_rejection(self, sent: str) -> str | None:
        """The upstream refused ``sent`` (HTTP 401, gRPC UNAUTHENTICATED): force a fresh token
        (shared with every other caller; none within 5 s of the last fetch) and return the
        token to repeat the call with, or None when the holder has no other one."""
        if self._holder.should_force():
            await self._refresher.fetch()
        token = self._holder.current()
        if token is None or token.token == sent or not _SENDABLE.fullmatch(token.token):
            return None
        return token.token

    def _why(self) -> str:
        holder = self._holder
        rejection = holder.rejection
        if rejection is not None:
            return f"no unexpired token held: the CP refused this pod ({rejection.status})"
        return f"no unexpired token held: {holder.last_error or 'no token fetched yet'}"
