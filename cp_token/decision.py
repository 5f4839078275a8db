"""The one decision behind every door: credential -> authenticate -> rate limit -> policy -> mint.

``GET /token`` and ``POST /oauth2/token`` parse their request into a :class:`TokenAsk` and
call :meth:`TokenDecision.decide`; nothing about the protocol reaches this module, and there
is no second pipeline. Refusals are the error types of :mod:`cp_token.errors`; each door maps
them to its own protocol's responses.
"""

from __future__ import annotations

from dataclasses import dataclass

from cp_token.authn import Authenticator
from cp_token.identity import Identity
from cp_token.kube import labels_of
from cp_token.minters import DEFAULT_OPTIONS, IssuedToken, Minter, MintOptions
from cp_token.objects import ObjectCache
from cp_token.policy import RunnerPolicy
from cp_token.ratelimit import RateLimiter

__all__ = ["ACCESS_TOKEN_TYPE", "TokenAsk", "TokenDecision", "Trace"]

ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


@dataclass(frozen=True)
class TokenAsk:
    """What a door asks for: the presented credential and how to narrow the issued token.

    ``token_type`` is the RFC 8693 token type to issue (echoed as ``issued_token_type``).
    """

    credential: str
    options: MintOptions = DEFAULT_OPTIONS
    token_type: str = ACCESS_TOKEN_TYPE


@dataclass
class Trace:
    """What one request revealed on its way through, for its audit line (no token here).

    ``peer`` is the client address, for an authenticator that shares review slots fairly.
    """

    peer: str | None = None
    identity: Identity | None = None
    issued: IssuedToken | None = None


class TokenDecision:
    """Authenticate, rate-limit (one bucket per identity, whatever the door), authorize, mint."""

    def __init__(
        self,
        *,
        authenticator: Authenticator,
        policy: RunnerPolicy,
        minter: Minter,
        limiter: RateLimiter,
        objects: ObjectCache | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._policy = policy
        self._minter = minter
        self._limiter = limiter
        self._objects = objects

    async def decide(self, ask: TokenAsk, trace: Trace) -> IssuedToken:
        """The issued token, or raise a :class:`~cp_token.errors.CPTokenError`.

        ``trace`` receives the identity as soon as it is known, and the issued token.
        """
        identity = await self._authenticator.authenticate(ask.credential)
        trace.identity = identity
        self._limiter.check(identity.username)
        await self._authorize(identity)
        # Options only when asked: a minter written before options existed keeps working.
        if ask.options is DEFAULT_OPTIONS:
            issued = await self._minter.mint(identity)
        else:
            issued = await self._minter.mint(identity, ask.options)
        trace.issued = issued
        return issued

    async def _authorize(self, identity: Identity) -> None:
        policy, objects = self._policy, self._objects
        policy.check_identity(identity)
        if objects is None or not policy.needs_labels:
            return
        ns, sa = identity.namespace, identity.service_account
        assert ns is not None and sa is not None  # check_identity ensured it
        ns_obj = await objects.namespace(ns) if policy.namespace_label else {}
        sa_obj = await objects.service_account(ns, sa) if policy.managed_label else {}
        policy.check_labels(
            identity,
            None if ns_obj is None else labels_of(ns_obj),
            None if sa_obj is None else labels_of(sa_obj),
        )
