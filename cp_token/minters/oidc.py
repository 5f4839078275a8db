"""The ``oidc`` minter: one upstream token from an OAuth2 client-credentials grant.

RFC 6749 §4.4 against ``OIDC_TOKEN_URL`` (client_secret_basic). The token is refreshed in the
background halfway through its usable window (its lifetime minus ``CP_TOKEN_MIN_TTL``), so
requests never wait; concurrent callers share one in-flight fetch; no caller ever receives a
token with less than ``CP_TOKEN_MIN_TTL`` left. Every session receives the same token: this
minter has no per-session scope and no per-pod revocation (the ``jwt`` minter has).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from cp_token.authn.precheck import decode_unverified
from cp_token.clock import Clock
from cp_token.errors import Unauthenticated, Unavailable
from cp_token.identity import Identity
from cp_token.minters import DEFAULT_OPTIONS, IssuedToken, MintOptions

__all__ = ["OidcMinter", "UpstreamToken"]

log = logging.getLogger(__name__)

PERMANENT_ERRORS = frozenset({"invalid_client", "unauthorized_client"})
BACKOFF_BASE = 1.0
BACKOFF_CAP = 30.0


@dataclass(frozen=True)
class UpstreamToken:
    """The IdP's token and when it expires (monotonic for decisions, wall for display)."""

    token: str
    expires_mono: float
    expires_wall: float
    lifetime: float


class IdPError(Exception):
    """The IdP call failed; ``permanent`` when retrying cannot help (bad credentials)."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


class OidcMinter:
    """Client-credentials token, shared by every caller, refreshed ahead of time."""

    def __init__(
        self,
        *,
        token_url: str,
        client_id: str,
        client_secret: Callable[[], str],
        min_ttl: float,
        clock: Clock,
        scope: str | None = None,
        audience: str | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        metrics: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        self._url = token_url
        self._client_id = client_id
        self._secret = client_secret
        self._min_ttl = min_ttl
        self._clock = clock
        self._scope = scope
        self._audience = audience
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
            # The IdP is often outside the cluster, behind an egress proxy: honour HTTPS_PROXY /
            # NO_PROXY here. This call carries the CP's client credentials, never an SA token.
            trust_env=True,
            follow_redirects=False,
            transport=transport,
        )
        self._current: UpstreamToken | None = None
        self._inflight: asyncio.Task[UpstreamToken] | None = None
        self._problem: str | None = None
        self._wake = asyncio.Event()
        self.fetches = 0  # upstream calls made, for tests and metrics

    @property
    def problem(self) -> str | None:
        """Set while the IdP rejects the client credentials (a permanent misconfiguration)."""
        return self._problem

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._inflight is not None:
            self._inflight.cancel()
        await self._client.aclose()

    def credentials_changed(self) -> None:
        """The client secret file changed: fetch again now instead of waiting."""
        self._wake.set()

    def _usable(self, tok: UpstreamToken | None) -> bool:
        return tok is not None and tok.expires_mono - self._clock.monotonic() >= self._min_ttl

    async def mint(self, identity: Identity, options: MintOptions = DEFAULT_OPTIONS) -> IssuedToken:
        """The shared upstream token, with at least ``min_ttl`` left; else 503.

        ``options`` cannot narrow it: every caller gets the same upstream token.
        """
        tok = self._current
        if not self._usable(tok):
            try:
                tok = await self._refresh()
            except IdPError as exc:
                raise Unavailable(
                    "the identity provider is unavailable",
                    reason="idp_rejected" if exc.permanent else "idp_unavailable",
                    retry_after=5,
                ) from None
            if not self._usable(tok):
                log.error(
                    "the IdP's tokens live less than CP_TOKEN_MIN_TTL (%ss): lower it",
                    self._min_ttl,
                )
                raise Unavailable(
                    "the identity provider issues tokens that are too short-lived",
                    reason="idp_short_lived",
                    retry_after=30,
                )
        assert tok is not None
        left = tok.expires_mono - self._clock.monotonic()
        return IssuedToken(token=tok.token, expires_at=self._clock.time() + left)

    async def _refresh(self) -> UpstreamToken:
        """One upstream fetch, shared by every concurrent caller."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch())
            self._inflight.add_done_callback(self._fetch_done)
        return await asyncio.shield(self._inflight)

    def _fetch_done(self, task: asyncio.Task[UpstreamToken]) -> None:
        self._inflight = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self._current = task.result()
            self._problem = None
            if self._metrics is not None:
                self._metrics.dependency("idp", True)
        elif isinstance(exc, IdPError):
            if exc.permanent:
                self._problem = f"OIDC_CLIENT_ID/OIDC_CLIENT_SECRET: {exc.reason}"
            if self._metrics is not None:
                self._metrics.dependency("idp", False)

    async def _fetch(self) -> UpstreamToken:
        self.fetches += 1
        form = {"grant_type": "client_credentials"}
        if self._scope:
            form["scope"] = self._scope
        if self._audience:
            form["audience"] = self._audience
        start = time.perf_counter()
        result = "error"
        try:
            secret = self._secret()
            try:
                resp = await self._client.post(
                    self._url,
                    data=form,
                    auth=httpx.BasicAuth(self._client_id, secret),
                    headers={"Accept": "application/json"},
                )
            except httpx.TimeoutException:
                result = "timeout"
                raise IdPError("the IdP timed out") from None
            except httpx.HTTPError as exc:
                result = "unreachable"
                raise IdPError(f"the IdP is unreachable ({type(exc).__name__})") from None
            result = str(resp.status_code)
            try:
                body = resp.json()
            except ValueError:
                body = None
            if resp.status_code != 200:
                error = body.get("error") if isinstance(body, dict) else None
                permanent = error in PERMANENT_ERRORS
                msg = f"the IdP answered {resp.status_code}" + (f" ({error})" if error else "")
                log.log(logging.ERROR if permanent else logging.WARNING, "%s", msg)
                raise IdPError(msg, permanent=permanent)
            return self._parse(body)
        finally:
            if self._metrics is not None:
                self._metrics.idp_call(result, time.perf_counter() - start)

    def _parse(self, body: Any) -> UpstreamToken:
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise IdPError("the IdP's answer carries no access_token")
        token = body["access_token"]
        now_mono, now_wall = self._clock.monotonic(), self._clock.time()
        expires_in = body.get("expires_in")
        if isinstance(expires_in, str) and expires_in.isdigit():
            expires_in = int(expires_in)
        lifetime: float | None = None
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
            lifetime = float(expires_in)
        else:
            try:  # no expires_in: a JWT access token still tells its own exp
                exp = decode_unverified(token).exp
            except Unauthenticated:
                exp = None
            if exp is not None:
                lifetime = exp - now_wall
        if lifetime is None:
            raise IdPError("the IdP's answer says nothing of the token's lifetime")
        return UpstreamToken(
            token=token,
            expires_mono=now_mono + lifetime,
            expires_wall=now_wall + lifetime,
            lifetime=lifetime,
        )

    def next_refresh_in(self, failures: int) -> float:
        """Seconds until the background task should fetch again."""
        tok = self._current
        if failures:
            backoff = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (failures - 1))
            return self._rng.uniform(backoff / 2, backoff)
        if tok is None:
            return 0.0
        # Halfway through the window in which the token still satisfies min_ttl.
        window_end = tok.expires_mono - self._min_ttl
        now = self._clock.monotonic()
        fetched = tok.expires_mono - tok.lifetime
        refresh_at = fetched + max(0.0, window_end - fetched) / 2
        return max(0.0, refresh_at - now)

    async def run(self) -> None:
        """Refresh ahead of expiry forever; failures back off, capped, with jitter."""
        failures = 0
        while True:
            delay = self.next_refresh_in(failures)
            if delay > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
                    failures = 0
                except TimeoutError:
                    pass
            try:
                await self._refresh()
                failures = 0
            except IdPError:
                failures += 1
