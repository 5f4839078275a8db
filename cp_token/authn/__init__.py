"""Who is calling: authenticators behind one protocol, and the review cache in front of them."""

from __future__ import annotations

from typing import Protocol

from cp_token.identity import Identity

__all__ = ["Authenticator", "Reviewer"]


class Reviewer(Protocol):
    """Turns one presented token into an Identity, or raises Unauthenticated/Unavailable."""

    async def review(self, token: str) -> Identity:
        """Authenticate the token (one upstream review; no caching at this level)."""
        ...


class Authenticator(Protocol):
    """What the app calls: authenticate a bearer token (cached, coalesced, capped)."""

    async def authenticate(self, token: str, *, peer: str | None = None) -> Identity:
        """The caller's identity, or raise Unauthenticated / Unavailable.

        ``peer``: the caller's source address, when the route knows it (fair shares).
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
