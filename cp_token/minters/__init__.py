"""Minters: turn an authorized Identity into an API token, behind one protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from cp_token.identity import Identity

__all__ = ["IssuedToken", "KeyPublisher", "Minter"]


@dataclass(frozen=True)
class IssuedToken:
    """A token to hand out, its expiry (wall clock; None = unknown) and its id."""

    token: str
    expires_at: float | None
    jti: str | None = None


class Minter(Protocol):
    """Issues API tokens; may run a background task; may report a permanent problem."""

    async def mint(self, identity: Identity) -> IssuedToken:
        """A token for this caller, or raise Unavailable."""
        ...

    async def run(self) -> None:
        """Background work (refresh ahead); returns at once when there is none."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...

    @property
    def problem(self) -> str | None:
        """A permanent misconfiguration found (readiness reason), else None."""
        ...


class KeyPublisher(Protocol):
    """A minter whose tokens can be verified by others (the ``jwt`` minter)."""

    issuer: str

    def jwks(self) -> dict[str, Any]:
        """The public keys as a JWK Set."""
        ...

    def openid_configuration(self) -> dict[str, Any]:
        """The OIDC discovery document pointing at the JWKS."""
        ...
