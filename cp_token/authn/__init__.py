"""Who is calling: authenticators behind one protocol, and the review cache in front of them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cp_token.identity import Identity

if TYPE_CHECKING:
    from cp_token.authn.precheck import UnverifiedJWT

__all__ = ["Authenticator", "DecodedReviewer", "ReadyReviewer", "Reviewer"]


class Reviewer(Protocol):
    """Turns one presented token into an Identity, or raises Unauthenticated/Unavailable."""

    async def review(self, token: str) -> Identity:
        """Authenticate the token (one upstream review; no caching at this level)."""
        ...


@runtime_checkable
class DecodedReviewer(Protocol):
    """A reviewer that can take the token already decoded by the precheck (a JWT is decoded
    once per review, not once per step)."""

    async def review_decoded(self, token: str, jwt: UnverifiedJWT) -> Identity:
        """:meth:`Reviewer.review`, given the token's unverified header and claims."""
        ...


@runtime_checkable
class ReadyReviewer(Protocol):
    """A reviewer that can often answer at once, from what it already holds."""

    def review_ready(self, token: str, jwt: UnverifiedJWT) -> Identity | None:
        """The review's answer (an Identity, or raise Unauthenticated) when nothing has to be
        awaited for it; None when it needs the API server (then the full review runs)."""
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
