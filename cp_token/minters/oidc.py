"""The ``oidc`` minter: one upstream token from an OAuth2 client-credentials grant.

RFC 6749 §4.4 against ``OIDC_TOKEN_URL`` (client_secret_basic). The token's windows are the
one :class:`~cp_token.runtime.refresh.RefreshPolicy`'s: the advisory window opens halfway
through its usable window (its lifetime minus ``CP_TOKEN_MIN_TTL``, at least
:data:`MIN_REFRESH_GAP` after the fetch), where the background task refreshes it while
requests keep the held token, so requests never wait; the last ``CP_TOKEN_MIN_TTL`` seconds
are the mandatory window, where a request waits for a refresh: no caller ever receives a
token with less than ``CP_TOKEN_MIN_TTL`` left. Concurrent callers share one in-flight call.
Every session receives the same token: this minter has no per-session scope and no per-pod
revocation (the ``jwt`` minter has).

While the IdP fails, every call to it (a request's or the refresher's) is paced by one
:class:`~cp_token.runtime.backoff.Pacer`: a request finding no usable token during the backoff gets
503 with ``Retry-After`` at once, from that state. Tokens that live less than
``CP_TOKEN_MIN_TTL`` count as a failure (logged once). A request waits for a call in flight
at most :data:`REQUEST_WAIT` seconds. Readiness (:attr:`OidcMinter.problem`) turns off only
when the IdP rejects the client credentials before any success: a misconfiguration found at
start; later, that rejection is logged and counted, and the cached token is still served.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from cp_token.authn.precheck import decode_unverified
from cp_token.client._http import MAX_BODY, decode_json, printable, token_problem
from cp_token.errors import Unauthenticated, Unavailable
from cp_token.identity import Identity
from cp_token.metrics import NO_METRICS, IdPMetrics
from cp_token.minters import DEFAULT_OPTIONS, IssuedToken, MintOptions
from cp_token.runtime.backoff import Backoff, Pacer, parse_retry_after
from cp_token.runtime.clock import MAX_SECONDS, Clock, sleep_or_wake
from cp_token.runtime.refresh import RefreshPolicy, Windows
from cp_token.runtime.singleflight import SharedCall

__all__ = [
    "IDP_BACKOFF",
    "IDP_DARK_BACKOFF",
    "REQUEST_WAIT",
    "IdPError",
    "IdPMetrics",
    "OidcMinter",
    "UpstreamToken",
]

log = logging.getLogger(__name__)

PERMANENT_ERRORS = frozenset({"invalid_client", "unauthorized_client"})
IDP_BACKOFF = Backoff(base=1.0, cap=30.0, floor=0.5)
# While no upstream token with CP_TOKEN_MIN_TTL left is held, every /token is a 503: the
# retry interval stays within 2 s (the IdP's Retry-After too), so /token is back within
# 2.5 s of the IdP healing (SPEC "Riding out faults"). Still one shared pace, whatever the
# request rate.
IDP_DARK_BACKOFF = Backoff(base=1.0, cap=2.0, floor=0.5)
REQUEST_WAIT = 5.0  # a request waits this long for a call in flight, then 503 (sidecars wait 10)
MIN_REFRESH_GAP = 1.0  # never refresh a good token more often than this, however short
REPEAT_LOG_EVERY = 300.0  # the same failure reason is logged again at most this often

_DESCRIPTIONS = {
    "idp_unavailable": "the identity provider is unavailable",
    "idp_rejected": "the identity provider rejects the CP's client credentials",
    "idp_short_lived": "the identity provider issues tokens that are too short-lived",
    "idp_timeout": "the identity provider is slow to answer",
}


@dataclass(frozen=True)
class UpstreamToken:
    """The IdP's token, when it expires (monotonic for decisions, wall for display), and
    its refresh windows. The token is left out of ``repr``: a log line or a traceback that
    shows the object never shows the credential."""

    token: str = field(repr=False)
    expires_mono: float
    expires_wall: float
    lifetime: float
    windows: Windows


class IdPError(Exception):
    """The IdP call failed; ``reason`` is the 503's reason (``idp_unavailable``,
    ``idp_rejected`` when retrying cannot help, ``idp_short_lived``)."""

    def __init__(
        self, message: str, *, reason: str = "idp_unavailable", retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after

    @property
    def permanent(self) -> bool:
        """The IdP rejects the client credentials."""
        return self.reason == "idp_rejected"


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
        metrics: IdPMetrics = NO_METRICS,
        rng: random.Random | None = None,
        request_wait: float = REQUEST_WAIT,
    ) -> None:
        self._url = token_url
        self._client_id = client_id
        self._secret = client_secret
        self._min_ttl = min_ttl
        # refresh halfway through the usable window; hand nothing out inside its last min_ttl
        self._refresh = RefreshPolicy(
            fraction=0.5, mandatory_before=min_ttl, min_gap=MIN_REFRESH_GAP
        )
        self._clock = clock
        self._scope = scope
        self._audience = audience
        self._metrics = metrics
        self._request_wait = request_wait
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
            # The IdP is often outside the cluster, behind an egress proxy: honour HTTPS_PROXY /
            # NO_PROXY here. This call carries the CP's client credentials, never an SA token.
            trust_env=True,
            follow_redirects=False,
            transport=transport,
        )
        self._pacer = Pacer(IDP_BACKOFF, clock, (rng or random.Random()).random)
        self._flight: SharedCall[UpstreamToken] = SharedCall()
        self._current: UpstreamToken | None = None
        self._served = False  # a call has succeeded since start
        self._failure: IdPError | None = None  # the last call's failure, until a success
        self._logged: dict[str, float] = {}  # failure reason -> when last logged
        self._problem: str | None = None
        self._wake = asyncio.Event()
        self.fetches = 0  # upstream calls made, for tests and metrics

    @property
    def held_until(self) -> float | None:
        """Unix time the held upstream token expires (None before the first success): the
        metric the "IdP failing while the token runs out" alert reads."""
        tok = self._current
        return None if tok is None else tok.expires_wall

    @property
    def problem(self) -> str | None:
        """Set while the IdP rejects the client credentials and never accepted them (a
        misconfiguration found at start)."""
        return self._problem

    @property
    def calling(self) -> bool:
        """Whether an IdP call is in flight."""
        return self._flight.running

    async def aclose(self) -> None:
        """Close the connection pool."""
        self._flight.cancel()
        await self._client.aclose()

    def credentials_changed(self) -> None:
        """The client secret file changed: call the IdP now instead of waiting."""
        self._pacer.reset()
        self._wake.set()

    def _usable(self, tok: UpstreamToken | None) -> bool:
        """Outside the mandatory window: at least ``min_ttl`` left."""
        return tok is not None and tok.windows.state(self._clock.monotonic()).usable

    # --- the request path -------------------------------------------------------------------

    async def mint(self, identity: Identity, options: MintOptions = DEFAULT_OPTIONS) -> IssuedToken:
        """The shared upstream token, with at least ``min_ttl`` left; else 503.

        ``options`` cannot narrow it: every caller gets the same upstream token.
        """
        tok = self._current
        if tok is None or not self._usable(tok):
            tok = await self._token_for_request()
        left = tok.expires_mono - self._clock.monotonic()
        return IssuedToken(token=tok.token, expires_at=self._clock.time() + left)

    async def _token_for_request(self) -> UpstreamToken:
        """Join the call in flight, or start one unless the backoff says wait: 503 then."""
        if not self._flight.running:
            wait = self._pacer.wait()
            if wait > 0:
                reason = self._failure.reason if self._failure else "idp_unavailable"
                raise self._unavailable(reason, wait)
        try:
            async with asyncio.timeout(self._request_wait):
                tok = await self._flight.do(self._call)
        except TimeoutError:
            raise self._unavailable("idp_timeout", 1.0) from None
        except IdPError as exc:
            raise self._unavailable(exc.reason, self._pacer.wait()) from None
        if not self._usable(tok):  # lived just enough when it arrived
            raise self._unavailable("idp_short_lived", self._pacer.wait())
        return tok

    @staticmethod
    def _unavailable(reason: str, retry_after: float) -> Unavailable:
        return Unavailable(_DESCRIPTIONS[reason], reason=reason, retry_after=max(1.0, retry_after))

    # --- one paced call, its outcome recorded -----------------------------------------------

    async def _call(self) -> UpstreamToken:
        try:
            tok = await self._fetch()
            if tok.lifetime < self._min_ttl:
                raise IdPError(
                    f"the IdP's tokens live {tok.lifetime:.0f}s, less than CP_TOKEN_MIN_TTL "
                    f"({self._min_ttl:g}s): lower CP_TOKEN_MIN_TTL or lengthen them at the IdP",
                    reason="idp_short_lived",
                )
        except IdPError as exc:
            self._failed(exc)
            raise
        self._succeeded(tok)
        return tok

    def _succeeded(self, tok: UpstreamToken) -> None:
        if self._failure is not None:
            log.info("the IdP answers again", extra={"fields": {"after": self._pacer.failures}})
        self._current = tok
        self._served = True
        self._problem = None
        self._failure = None
        self._logged.clear()
        self._pacer.succeeded()
        self._metrics.dependency("idp", True)

    def _failed(self, exc: IdPError) -> None:
        # The pace depends on what is held: nothing usable, and every /token waits on it.
        policy = IDP_BACKOFF if self._usable(self._current) else IDP_DARK_BACKOFF
        self._pacer.policy = policy
        retry_after = exc.retry_after
        if retry_after is not None:  # honoured up to the cap: one absurd value cannot stall
            retry_after = min(retry_after, policy.cap)
        delay = self._pacer.failed(retry_after)
        self._failure = exc
        if exc.permanent and not self._served:
            # a reason class for the probe port (which the network can reach); the IdP's
            # words and the variables to check go to the log below
            self._problem = "invalid_client"
        self._metrics.dependency("idp", False)
        now = self._clock.monotonic()
        last = self._logged.get(exc.reason)
        if last is None or now - last >= REPEAT_LOG_EVERY:
            self._logged[exc.reason] = now
            level = logging.WARNING if exc.reason == "idp_unavailable" else logging.ERROR
            fields = {"reason": exc.reason, "next_call_in": round(delay, 1)}
            if exc.permanent and self._served:
                fields["readiness"] = "unchanged: the cached token is served while it qualifies"
            log.log(level, "%s", exc, extra={"fields": fields})

    async def _fetch(self) -> UpstreamToken:
        """One call to the IdP; its result goes to the metric whatever happens. Whatever
        the IdP answers, only :class:`IdPError` comes out (its answer is untrusted input)."""
        self.fetches += 1
        start = time.perf_counter()
        result = "error"
        try:
            try:
                status, headers, body = await self._post()
            except httpx.TimeoutException:
                result = "timeout"
                raise IdPError("the IdP timed out") from None
            except httpx.HTTPError as exc:
                result = "unreachable"
                raise IdPError(f"the IdP is unreachable ({type(exc).__name__})") from None
            result = str(status)
            if status != 200:
                raise self._refusal(status, headers, body)
            try:
                return self._parse(body)
            except IdPError:
                result = "bad_answer"  # a 200 that is no token is no success
                raise
        except IdPError:
            raise
        except Exception as exc:  # an answer nothing below expected: a failed call all the same
            result = "bad_answer"
            raise IdPError(f"the IdP's answer could not be read ({type(exc).__name__})") from None
        finally:
            self._metrics.idp_call(result, time.perf_counter() - start)

    async def _post(self) -> tuple[int, httpx.Headers, bytes]:
        """POST the grant; (status, headers, body read raw up to :data:`MAX_BODY` bytes)."""
        form = {"grant_type": "client_credentials"}
        if self._scope:
            form["scope"] = self._scope
        if self._audience:
            form["audience"] = self._audience
        request = self._client.build_request(
            "POST",
            self._url,
            data=form,
            # raw bytes, never decompressed: a small gzip bomb cannot grow past the bound
            headers={"Accept": "application/json", "Accept-Encoding": "identity"},
        )
        auth = httpx.BasicAuth(self._client_id, self._secret())
        resp = await self._client.send(request, auth=auth, stream=True)
        try:
            if resp.is_stream_consumed:  # an in-process transport has read it already
                body = bytearray(resp.content)
            else:
                body = bytearray()
                async for chunk in resp.aiter_raw():
                    body += chunk
                    if len(body) > MAX_BODY:
                        raise IdPError(f"the IdP's answer is over {MAX_BODY} bytes")
        finally:
            await resp.aclose()
        return resp.status_code, resp.headers, bytes(body)

    def _refusal(self, status: int, headers: httpx.Headers, raw: bytes) -> IdPError:
        try:
            body = decode_json(raw)
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        error = printable(error, 64) if isinstance(error, str) else None
        msg = f"the IdP answered {status}" + (f" ({error!r})" if error else "")
        return IdPError(
            msg,
            reason="idp_rejected" if error in PERMANENT_ERRORS else "idp_unavailable",
            retry_after=parse_retry_after(headers.get("Retry-After"), self._clock.time()),
        )

    def _parse(self, raw: bytes) -> UpstreamToken:
        try:
            body = decode_json(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise IdPError("the IdP's answer carries no access_token")
        token = body["access_token"]
        if not token:
            raise IdPError("the IdP's answer carries an empty access_token")
        problem = token_problem(token)
        if problem is not None:  # it would be handed to every session as a bearer token
            raise IdPError(f"the IdP's answer carries {problem}")
        now_mono, now_wall = self._clock.monotonic(), self._clock.time()
        lifetime = self._lifetime(token, body.get("expires_in"), now_wall)
        if lifetime is None:
            raise IdPError("the IdP's answer says nothing usable of the token's lifetime")
        expires_mono = now_mono + lifetime
        return UpstreamToken(
            token=token,
            expires_mono=expires_mono,
            expires_wall=now_wall + lifetime,
            lifetime=lifetime,
            windows=self._refresh.windows(now_mono, expires_mono),
        )

    @staticmethod
    def _lifetime(token: str, expires_in: Any, now_wall: float) -> float | None:
        """Seconds the token lives: ``expires_in``, else a JWT's own ``exp``; None if
        neither says (or says something that is not a finite number)."""
        if isinstance(expires_in, str):  # some IdPs send "3600"; "²" passes str.isdigit()
            if not (expires_in.isascii() and expires_in.isdigit() and len(expires_in) <= 10):
                return None
            expires_in = int(expires_in)
        lifetime: float | None = None
        if isinstance(expires_in, int) and not isinstance(expires_in, bool):
            if not 0 <= expires_in <= MAX_SECONDS:  # 400 digits would overflow float()
                return None
            lifetime = float(expires_in)
        elif isinstance(expires_in, float):
            lifetime = expires_in
        elif expires_in is None:
            try:  # no expires_in: a JWT access token still tells its own exp
                exp = decode_unverified(token).exp
            except Unauthenticated:
                exp = None
            if exp is not None:
                lifetime = exp - now_wall
        if lifetime is None or not math.isfinite(lifetime) or lifetime > MAX_SECONDS:
            return None  # a lifetime of centuries is garbage too
        return lifetime

    # --- the background refresher -----------------------------------------------------------

    def next_refresh_in(self) -> float:
        """Seconds until the background task should call the IdP again: the backoff's
        wait while calls fail, else until the held token's advisory window opens (halfway
        through the window in which it still satisfies ``min_ttl``)."""
        if self._pacer.failures:
            return self._pacer.wait()
        tok = self._current
        if tok is None:
            return 0.0
        return max(0.0, tok.windows.advisory_at - self._clock.monotonic())

    async def run(self) -> None:
        """Refresh ahead of expiry forever; failures wait out the shared backoff. No answer
        ends this loop (a background job that ends stops the CP): an unforeseen failure is
        one more failed call, paced like the others."""
        while True:
            self._wake.clear()
            delay = self.next_refresh_in()
            if delay > 0:
                await sleep_or_wake(self._clock, delay, self._wake)
                continue  # look again: a request may have called meanwhile
            await self.refresh_once()

    async def refresh_once(self) -> None:
        """One background call to the IdP (or join the one in flight); its outcome is
        recorded, never raised."""
        try:
            await self._flight.do(self._call)
        except IdPError:
            pass
        except Exception as exc:  # defence in depth; its message may quote the answer
            self._failed(IdPError(f"the IdP call failed unexpectedly ({type(exc).__name__})"))
