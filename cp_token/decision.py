"""The one decision behind every door: credential -> authenticate -> rate limit -> policy -> mint.

``GET /token`` and ``POST /oauth2/token`` parse their request into a :class:`TokenAsk` and
call :meth:`TokenDecision.decide`; nothing about the protocol reaches this module, and there
is no second pipeline. Refusals are the error types of :mod:`cp_token.errors`; each door maps
them to its own protocol's responses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from cp_token.authn import Authenticator
from cp_token.authn.cache import ANSWER_WITHIN
from cp_token.errors import Forbidden
from cp_token.identity import Identity
from cp_token.kube.objects import ObjectCache
from cp_token.minters import DEFAULT_OPTIONS, IssuedToken, Minter, MintOptions
from cp_token.policy import RunnerPolicy
from cp_token.ratelimit import RateLimiter

__all__ = ["ACCESS_TOKEN_TYPE", "TokenAsk", "TokenDecision", "Trace"]

ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
MAX_VERDICTS = 10_000  # remembered policy verdicts; all are dropped when full


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
        answer_within: float = ANSWER_WITHIN,
    ) -> None:
        """``answer_within``: seconds from a request's start within which its Kubernetes
        reads (the review, then the label reads) are done, else 503 (SPEC's 12 s)."""
        self._authenticator = authenticator
        self._answer_within = answer_within
        self._policy = policy
        self._minter = minter
        self._limiter = limiter
        self._objects = objects
        # (username, pod-bound) -> None (allowed) or the refusal's (description, reason)
        self._verdicts: dict[tuple[str, bool], tuple[str, str] | None] = {}

    async def decide(self, ask: TokenAsk, trace: Trace) -> IssuedToken:
        """The issued token, or raise a :class:`~cp_token.errors.CPTokenError`.

        ``trace`` receives the identity as soon as it is known, and the issued token.
        """
        started = asyncio.get_running_loop().time()
        identity = await self._authenticator.authenticate(ask.credential, peer=trace.peer)
        trace.identity = identity
        self._limiter.check(identity.username)
        await self._authorize(identity, started + self._answer_within)
        # Options only when asked: a minter written before options existed keeps working.
        if ask.options is DEFAULT_OPTIONS:
            issued = await self._minter.mint(identity)
        else:
            issued = await self._minter.mint(identity, ask.options)
        trace.issued = issued
        return issued

    async def _authorize(self, identity: Identity, deadline: float) -> None:
        policy, objects = self._policy, self._objects
        self._check_identity(identity)
        if objects is None or not policy.needs_labels:
            return
        ns, sa = identity.namespace, identity.service_account
        assert ns is not None and sa is not None  # check_identity ensured it
        no_labels: Mapping[str, str] = {}
        ns_labels = (
            await objects.namespace_labels(ns, deadline) if policy.namespace_label else no_labels
        )
        sa_labels = (
            await objects.service_account_labels(ns, sa, deadline)
            if policy.managed_label
            else no_labels
        )
        policy.check_labels(identity, ns_labels, sa_labels)

    def _check_identity(self, identity: Identity) -> None:
        """The policy's lookup-free checks; the verdict is remembered per username and pod
        binding (all they depend on), so a returning caller costs one dictionary lookup."""
        key = (identity.username, identity.pod_bound)
        verdicts = self._verdicts
        if key not in verdicts:
            verdict: tuple[str, str] | None = None
            try:
                self._policy.check_identity(identity)
            except Forbidden as exc:
                verdict = (exc.description, exc.reason)
            if len(verdicts) >= MAX_VERDICTS:
                verdicts.clear()
            verdicts[key] = verdict
        verdict = verdicts[key]
        if verdict is not None:
            description, reason = verdict
            raise Forbidden(description, reason=reason)
