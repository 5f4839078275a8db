"""Minters: turn an authorized Identity into an API token, behind one protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from cp_token.identity import Identity

__all__ = ["DEFAULT_OPTIONS", "IssuedToken", "KeyPublisher", "MintOptions", "Minter"]


@dataclass(frozen=True)
class IssuedToken:
    """A token to hand out, its expiry (wall clock; None = unknown) and its id (the token is
    left out of ``repr``)."""

    token: str = field(repr=False)
    expires_at: float | None
    jti: str | None = None


@dataclass(frozen=True)
class MintOptions:
    """What one request asks of the minter beyond the identity (a token exchange's narrowing).

    ``audiences``: the ``aud`` to issue (None: the minter's configured audience); ``scopes``:
    granted scopes for a ``scope`` claim. Only the ``jwt`` minter honours them; the app has
    already checked them against the operator's allow-lists.
    """

    audiences: tuple[str, ...] | None = None
    scopes: tuple[str, ...] = ()


DEFAULT_OPTIONS = MintOptions()


class Minter(Protocol):
    """Issues API tokens; may run a background task; may report a permanent problem."""

    async def mint(self, identity: Identity, options: MintOptions = DEFAULT_OPTIONS) -> IssuedToken:
        """A token for this caller (narrowed by ``options`` where supported), or Unavailable."""
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
