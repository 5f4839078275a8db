"""TokenSource: where a process gets its API token, cached in-process.

Three origins, chosen once (:meth:`TokenSource.from_env` follows SPEC's resolution order,
and a failure never falls through to the next):

- the pod's **sidecar** (``GET`` with ``Ambient-Token-Request: true``; ``POST`` to force a
  fresh token after :meth:`TokenSource.invalidate`),
- the **CP** directly (``GET`` with the pod's ServiceAccount token, re-read on every fetch),
- a **static** token (``BOT_TOKEN``, local development).

The cached token is refreshed ahead of time by the one refresh-ahead policy
(:class:`~cp_token.runtime.refresh.RefreshPolicy`): in its advisory window one caller
refreshes (one attempt; the cached token is kept if it fails) while the others keep using
the cached token without waiting; in its mandatory window (the last
:data:`MANDATORY_REFRESH` seconds) callers wait for one refresh, retried within the deadline,
and the cached token is not handed out. See :class:`TokenSource`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, Unpack

import httpx

from cp_token.runtime.clock import Clock, SystemClock
from cp_token.runtime.errors import ConfigError
from cp_token.runtime.refresh import Freshness, RefreshPolicy, Windows
from cp_token.runtime.singleflight import SharedCall
from cp_token.settings.client import (
    DEFAULT_SA_TOKEN_FILE,
    TIMEOUT,
    ClientSettings,
    load_client_settings,
)
from cp_token.settings.common import parse_url

from ._errors import TokenError, TokenRejected, TokenUnavailable
from ._http import (
    MAX_BODY,
    SIDECAR_HEADER,
    FetchedToken,
    RawAnswer,
    ServiceAccountTokenFile,
    client_options,
    parse_token_response,
    transport_error,
)
from ._retry import Retrier, RetryPolicy

__all__ = ["SourceOptions", "TokenSource"]

log = logging.getLogger("cp_token.client")

# After a best-effort early refresh, wait this long before the next one: a sidecar that is
# riding out a CP outage hands back the same short-lived token, and asking it again on
# every call would only add load.
EARLY_REFRESH_PAUSE = 5.0
# The mandatory window: with fewer seconds than this left, a cached token is not handed out;
# callers wait for a refresh (retried within the deadline), and its failure is raised.
MANDATORY_REFRESH = 10.0

_bot_warned = False

SEALED = (
    "this pod is sealed (AMBIENT_API_URL or AMBIENT_GRPC_ADDR is set): its token never leaves "
    "the sidecar, which adds it to the pod's API calls; call the API through "
    "cp_token.client.api_client(), api_async_client() or grpc_channel() instead of "
    "reading a token"
)


def _warn_bot_token_once() -> None:
    global _bot_warned
    if not _bot_warned:
        _bot_warned = True
        log.warning(
            "using BOT_TOKEN: a static development token; set AMBIENT_TOKEN_SIDECAR_URL or "
            "AMBIENT_CP_TOKEN_URL in a pod"
        )


# The body is read raw (never decompressed: a small gzip bomb cannot grow past the bound)
_IDENTITY = {"Accept-Encoding": "identity"}


def _check_length(response: httpx.Response, url: str) -> None:
    """A declared body over :data:`MAX_BODY` is refused before any of it is read."""
    declared = response.headers.get("content-length", "")
    if (
        declared.isascii()
        and declared.isdigit()
        and (len(declared) > 12 or int(declared) > MAX_BODY)
    ):
        raise TokenUnavailable(f"{url}: answer body over {MAX_BODY} bytes", url)


def _check_size(body: bytearray, url: str) -> None:
    if len(body) > MAX_BODY:
        raise TokenUnavailable(f"{url}: answer body over {MAX_BODY} bytes", url)


def _answer(response: httpx.Response, body: bytes) -> RawAnswer:
    return RawAnswer(
        response.status_code, response.reason_phrase, dict(response.headers.items()), body
    )


def _unreadable(url: str, exc: Exception) -> TokenUnavailable:
    """An answer that broke something under the parser (its message is not relayed: it
    may quote the answer)."""
    return TokenUnavailable(f"{url}: the answer could not be read ({type(exc).__name__})", url)


def _kept(cached: FetchedToken, exc: TokenError) -> FetchedToken:
    """A best-effort refresh failed while the cached token is still valid: keep it."""
    log.warning("token refresh failed, keeping the cached token: %s", exc)
    return cached


class _Need(enum.Enum):
    """What a call must do about the cached token, from its :class:`Freshness`."""

    SERVE = "serve"  # FRESH, or an early refresh ended within EARLY_REFRESH_PAUSE
    ADVISORY = "advisory"  # one caller refreshes once; the others serve the cached token
    BEST_EFFORT = "best_effort"  # short of the caller's min_ttl: wait for one attempt
    MANDATORY = "mandatory"  # nothing to serve: wait for the refresh, raise if it fails


@dataclass(frozen=True, slots=True)
class _Held:
    """The cached token and its windows, computed once when it is stored."""

    token: FetchedToken
    windows: Windows


@dataclass(frozen=True, slots=True)
class _Attempt:
    """A refresh made under the sync lock: its serial, and its failure (None: it brought a
    token), so callers who waited for it share its outcome instead of repeating it."""

    serial: int
    error: TokenError | None = None
    mandatory: bool = False


@dataclass(frozen=True, slots=True)
class _Refreshed:
    """An async refresh's outcome: the token, and whether it was fetched (or kept)."""

    token: FetchedToken
    fetched: bool


class SourceOptions(TypedDict, total=False):
    """Optional knobs shared by the constructor and :meth:`TokenSource.from_env`."""

    deadline: float
    refresh_before: float
    refresh_fraction: float
    clock: Clock
    rand: Callable[[], float]
    sync_sleep: Callable[[float], None]
    transport: httpx.BaseTransport
    async_transport: httpx.AsyncBaseTransport


Mode = Literal["sidecar", "direct", "static"]


class TokenSource:
    """A cached, self-refreshing API token (see the module docstring for the origins).

    Give exactly one of ``sidecar_url``, ``cp_url`` (with ``sa_token_file``) or
    ``static_token``. ``timeout`` is per request, ``deadline`` bounds all retries of one
    call.

    A cached token passes through the windows of the one
    :class:`~cp_token.runtime.refresh.RefreshPolicy` (the model: botocore's
    ``RefreshableCredentials``); its *usable lifetime* is its lifetime minus the mandatory
    window:

    - **fresh**: :meth:`token` and :meth:`atoken` return it, no I/O and no lock.
    - **advisory**, once ``refresh_fraction`` (default 0.1) of the usable lifetime is left, or
      ``refresh_before`` (default 30) seconds before expiry, whichever comes first: exactly
      one caller refreshes (one attempt; sync callers through a non-blocking lock, async ones
      through one shared call) while every other caller gets the cached token at once. A
      failed attempt keeps the cached token, and the next one waits
      :data:`EARLY_REFRESH_PAUSE` seconds.
    - **mandatory**, the last :data:`MANDATORY_REFRESH` seconds: the cached token is not
      handed out. Callers wait for one shared refresh, retried within ``deadline``; when it
      fails they get its error (:class:`TokenUnavailable` for transient failures). A token
      the refresh brings is handed out whatever it has left (the origin's best, just now).
    - **expired**, and nothing cached: as mandatory.

    A caller's ``min_ttl`` larger than the mandatory window opens a mandatory window of
    its own, best effort: that caller waits for the refresh, but gets the still valid
    cached token when it fails (and within :data:`EARLY_REFRESH_PAUSE` of the last attempt,
    at once). A token of unknown expiry stays fresh.
    """

    def __init__(
        self,
        *,
        sidecar_url: str | None = None,
        cp_url: str | None = None,
        sa_token_file: str = DEFAULT_SA_TOKEN_FILE,
        static_token: str | None = None,
        ca_file: str | None = None,
        timeout: float = TIMEOUT,
        **options: Unpack[SourceOptions],
    ) -> None:
        given = [v for v in (sidecar_url, cp_url, static_token) if v is not None]
        if len(given) != 1:
            raise TokenError("give exactly one of sidecar_url, cp_url or static_token")
        self._mode: Mode = "sidecar" if sidecar_url else "direct" if cp_url else "static"
        url = sidecar_url or cp_url
        if url is not None:
            name = "AMBIENT_TOKEN_SIDECAR_URL" if sidecar_url else "AMBIENT_CP_TOKEN_URL"
            try:
                parse_url(name, url)
            except ConfigError as exc:
                raise TokenError(str(exc)) from None
        self.url = url or "BOT_TOKEN"
        self._static = static_token
        self._ca_file = ca_file
        self._timeout = timeout
        share, before = options.get("refresh_fraction", 0.1), options.get("refresh_before", 30.0)
        if not (0.0 <= share <= 1.0 and before >= 0.0):
            raise TokenError("refresh_fraction must be within 0..1 and refresh_before >= 0")
        self._policy = RefreshPolicy(
            fraction=1.0 - share, advisory_before=before, mandatory_before=MANDATORY_REFRESH
        )
        clock = options.get("clock")
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._retry = Retrier(
            RetryPolicy(deadline=options.get("deadline", 30.0)),
            self._clock,
            options.get("rand", random.random),
        )
        default_sleep = time.sleep if clock is None else getattr(clock, "advance", time.sleep)
        self._sync_sleep: Callable[[float], None] = options.get("sync_sleep", default_sleep)
        self._transport = options.get("transport")
        self._async_transport = options.get("async_transport")

        self._held: _Held | None = None  # the cached token
        self._force_next = False
        self._early_after = -math.inf
        self._lock = threading.Lock()  # one sync refresh at a time
        self._last_attempt = _Attempt(0)  # the last refresh made under the lock
        self._client_lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._aclient: httpx.AsyncClient | None = None
        self._aclient_loop: asyncio.AbstractEventLoop | None = None
        self._flight: SharedCall[_Refreshed] = SharedCall()  # concurrent awaiters share
        self._sa_file = ServiceAccountTokenFile(sa_token_file)

    # --- construction from the environment ----------------------------------------------

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **options: Unpack[SourceOptions]
    ) -> TokenSource:
        """The source SPEC's resolution order picks: ``AMBIENT_TOKEN_SIDECAR_URL``, then
        ``AMBIENT_CP_TOKEN_URL`` (+ ``AMBIENT_SA_TOKEN_FILE``), then ``BOT_TOKEN``.

        The first variable that is set decides. Raises :class:`TokenError` for a bad or
        missing configuration, and in a sealed pod (``AMBIENT_API_URL`` or
        ``AMBIENT_GRPC_ADDR`` set), where no container but the sidecar holds a token.
        """
        try:
            settings = load_client_settings(env)
        except ConfigError as exc:
            raise TokenError(str(exc)) from None
        return cls.from_settings(settings, **options)

    @classmethod
    def from_settings(
        cls, settings: ClientSettings, **options: Unpack[SourceOptions]
    ) -> TokenSource:
        """Like :meth:`from_env`, from already loaded :class:`ClientSettings`."""
        if settings.sealed:
            raise TokenError(SEALED)
        common: dict[str, Any] = {"ca_file": settings.ca_file, "timeout": settings.timeout}
        if settings.sidecar_url:
            return cls(sidecar_url=settings.sidecar_url, **common, **options)
        if settings.cp_token_url:
            return cls(
                cp_url=settings.cp_token_url,
                sa_token_file=settings.sa_token_file,
                **common,
                **options,
            )
        if settings.bot_token:
            _warn_bot_token_once()
            return cls(static_token=settings.bot_token, **options)
        raise TokenError(
            "no token source: set AMBIENT_TOKEN_SIDECAR_URL (the pod's sidecar), "
            "AMBIENT_CP_TOKEN_URL (the CP directly) or BOT_TOKEN (local development)"
        )

    @property
    def mode(self) -> Mode:
        """``sidecar``, ``direct`` or ``static``."""
        return self._mode

    def sa_token_changed(self) -> bool:
        """Whether ``AMBIENT_SA_TOKEN_FILE`` now holds another token than the one last sent
        (direct mode; False when nothing was sent yet or the file cannot be read). A small
        local read: cheap enough to poll while the CP refuses the last one."""
        return self._mode == "direct" and self._sa_file.changed()

    # --- the cached token ---------------------------------------------------------------

    def token(self, min_ttl: float | None = None) -> str:
        """A valid token (from the cache when fresh enough); blocks while fetching.

        ``min_ttl`` asks for at least that many seconds of lifetime; it is best effort when
        the upstream cannot provide more (the token returned is always unexpired). See the
        class docstring for who waits for a refresh and who gets the cached token.
        """
        held = self._held
        need = self._need(held, min_ttl)
        if held is not None and need is _Need.SERVE:
            return held.token.token
        if held is not None and need is _Need.ADVISORY:
            if not self._lock.acquire(blocking=False):
                return held.token.token  # another caller is refreshing: keep using this one
            try:
                return self._refresh(min_ttl, None)
            finally:
                self._lock.release()
        seen = self._last_attempt.serial
        with self._lock:
            return self._refresh(min_ttl, seen)

    async def atoken(self, min_ttl: float | None = None) -> str:
        """Async :meth:`token`; concurrent awaiters share one fetch."""
        while True:
            held = self._held
            need = self._need(held, min_ttl)
            if held is not None and (
                need is _Need.SERVE or (need is _Need.ADVISORY and self._flight.running)
            ):
                return held.token.token
            outcome = await self._flight.do(lambda: self._arefresh(min_ttl))
            if outcome.fetched or need is not _Need.MANDATORY:
                return outcome.token.token
            # the refresh this caller joined was an advisory one that kept the cached token,
            # which has since come into the mandatory window: wait for a mandatory one

    def invalidate(self, token: str | None = None) -> None:
        """Drop the cached token (e.g. after the API rejected it with a 401).

        Given the rejected ``token``, a no-op when the cache already holds another one (a
        concurrent caller refreshed it). Through the sidecar, the next fetch is a ``POST``,
        which makes the sidecar fetch a fresh token instead of returning its cached one.
        """
        held = self._held
        if token is not None and (held is None or held.token.token != token):
            return
        self._held = None
        self._force_next = True
        self._early_after = -math.inf

    def _need(self, held: _Held | None, min_ttl: float | None) -> _Need:
        """What a call asking for ``min_ttl`` must do now about ``held``."""
        if held is None:
            return _Need.MANDATORY
        now = self._clock.monotonic()
        state = held.windows.state(now, min_ttl or 0.0)
        if state is Freshness.FRESH:
            return _Need.SERVE
        # short of the caller's min_ttl only, or inside the policy's own mandatory window?
        own = held.windows.state(now) if min_ttl and not state.usable else state
        if not own.usable:
            return _Need.MANDATORY
        if now < self._early_after:
            return _Need.SERVE
        return _Need.ADVISORY if state is Freshness.ADVISORY else _Need.BEST_EFFORT

    def _refresh(self, min_ttl: float | None, seen: int | None) -> str:
        """Under the sync lock: refresh as the plan says. ``seen`` is the serial of the last
        attempt when this caller began to wait (None: it did not wait)."""
        last = self._last_attempt
        held = self._held
        if seen is not None and last.serial != seen:  # one ended while this caller waited
            if last.error is not None and last.mandatory:
                raise last.error  # nothing to serve, and the refresh failed: share its error
            if (
                last.error is None
                and held is not None
                and held.token.valid_at(self._clock.monotonic())
            ):
                return held.token.token  # it brought a token: share it
        need = self._need(held, min_ttl)
        if held is not None and need is _Need.SERVE:
            return held.token.token
        serial = last.serial + 1
        if held is None or need is _Need.MANDATORY:
            try:
                fetched = self.fetch(min_ttl)
            except TokenError as exc:
                self._last_attempt = _Attempt(serial, exc, mandatory=True)
                raise
            self._last_attempt = _Attempt(serial)
            return fetched.token
        try:
            fetched = self.fetch_once(min_ttl)
        except TokenError as exc:
            self._last_attempt = _Attempt(serial, exc)
            if isinstance(exc, TokenRejected):
                raise
            return _kept(held.token, exc).token
        finally:
            self._pause()
        self._last_attempt = _Attempt(serial)
        return fetched.token

    async def _arefresh(self, min_ttl: float | None) -> _Refreshed:
        """The shared async refresh: with nothing to serve, retried until the deadline;
        else a single attempt that keeps the cached token if it fails."""
        held = self._held
        need = self._need(held, min_ttl)
        if held is not None and need is _Need.SERVE:
            return _Refreshed(held.token, fetched=False)
        if held is None or need is _Need.MANDATORY:
            return _Refreshed(await self.afetch(min_ttl), fetched=True)
        try:
            return _Refreshed(await self.afetch_once(min_ttl), fetched=True)
        except TokenRejected:
            raise
        except TokenError as exc:
            return _Refreshed(_kept(held.token, exc), fetched=False)
        finally:
            self._pause()

    def _pause(self) -> None:
        """An early (advisory or best-effort) attempt just ended: the next one waits
        :data:`EARLY_REFRESH_PAUSE` (its token may be the same short-lived one again)."""
        self._early_after = self._clock.monotonic() + EARLY_REFRESH_PAUSE

    # --- fetching -----------------------------------------------------------------------

    def fetch(self, min_ttl: float | None = None, *, force: bool = False) -> FetchedToken:
        """Fetch a token now (no cache check), retrying transient failures until the
        deadline; raises :class:`TokenRejected` or :class:`TokenUnavailable`."""
        return self._retry.call(lambda: self.fetch_once(min_ttl, force=force), self._sync_sleep)

    async def afetch(self, min_ttl: float | None = None, *, force: bool = False) -> FetchedToken:
        """Async :meth:`fetch`."""
        return await self._retry.acall(lambda: self.afetch_once(min_ttl, force=force))

    def fetch_once(self, min_ttl: float | None = None, *, force: bool = False) -> FetchedToken:
        """One attempt, no retry: the caller owns the backoff (the sidecar's holder does).

        ``force`` asks a sidecar for a fresh token (``POST``); the CP always mints afresh.
        Transient trouble raises :class:`TokenUnavailable` (with ``retry_after`` when the
        server sent one).
        """
        if self._static is not None:
            return self._store(FetchedToken(self._static, None, None, self._clock.monotonic()))
        method, params, headers = self._request_parts(min_ttl, force)
        client = self._sync_client()
        started = self._clock.monotonic()
        try:
            with client.stream(method, self.url, params=params, headers=headers) as response:
                _check_length(response, self.url)
                body = bytearray(response.content if response.is_stream_consumed else b"")
                for chunk in () if response.is_stream_consumed else response.iter_raw():
                    body += chunk
                    _check_size(body, self.url)
                answer = _answer(response, bytes(body))
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.url) from None
        except TokenError:
            raise
        except Exception as exc:  # an answer no parser below us expected: still transient
            raise _unreadable(self.url, exc) from None
        return self._store(self._parse(answer, started))

    async def afetch_once(
        self, min_ttl: float | None = None, *, force: bool = False
    ) -> FetchedToken:
        """Async :meth:`fetch_once`."""
        if self._static is not None:
            return self._store(FetchedToken(self._static, None, None, self._clock.monotonic()))
        method, params, headers = self._request_parts(min_ttl, force)
        client = self._async_client()
        started = self._clock.monotonic()
        try:
            async with client.stream(method, self.url, params=params, headers=headers) as response:
                _check_length(response, self.url)
                body = bytearray(response.content if response.is_stream_consumed else b"")
                if not response.is_stream_consumed:  # (an in-process transport's is read)
                    async for chunk in response.aiter_raw():
                        body += chunk
                        _check_size(body, self.url)
                answer = _answer(response, bytes(body))
        except httpx.HTTPError as exc:
            raise transport_error(exc, self.url) from None
        except TokenError:
            raise
        except Exception as exc:  # an answer no parser below us expected: still transient
            raise _unreadable(self.url, exc) from None
        return self._store(self._parse(answer, started))

    def _request_parts(
        self, min_ttl: float | None, force: bool
    ) -> tuple[str, dict[str, str], dict[str, str]]:
        if self._mode == "direct":
            sa_token = self._sa_file.read_for_sending()
            return "GET", {}, {"Authorization": f"Bearer {sa_token}", **_IDENTITY}
        params = {} if min_ttl is None else {"min_ttl": str(math.ceil(min_ttl))}
        method = "POST" if force or self._force_next else "GET"
        return method, params, {SIDECAR_HEADER: "true", **_IDENTITY}

    def _parse(self, answer: RawAnswer, started: float) -> FetchedToken:
        return parse_token_response(
            answer, self.url, fetched_at=started, wall_now=self._clock.time()
        )

    def _store(self, fetched: FetchedToken) -> FetchedToken:
        self._held = _Held(fetched, self._policy.windows(fetched.fetched_at, fetched.expiry))
        self._force_next = False
        return fetched

    # --- HTTP clients -------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        try:
            tls = not self.url.lower().startswith("http://")
            return client_options(self._ca_file, self._timeout, tls=tls)
        except (OSError, ValueError) as exc:
            raise TokenError(f"cannot load the CA file {self._ca_file!r} ({exc})") from None

    def _sync_client(self) -> httpx.Client:
        with self._client_lock:
            if self._client is None:
                self._client = httpx.Client(transport=self._transport, **self._options())
            return self._client

    def _async_client(self) -> httpx.AsyncClient:
        # An AsyncClient's connections belong to the loop that opened them.
        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aclient_loop is not loop:
            self._aclient = httpx.AsyncClient(transport=self._async_transport, **self._options())
            self._aclient_loop = loop
        return self._aclient

    def close(self) -> None:
        """Close the sync HTTP client."""
        if self._client is not None:
            self._client.close()
            self._client = None

    async def aclose(self) -> None:
        """Close both HTTP clients."""
        self.close()
        if self._aclient is not None and self._aclient_loop is asyncio.get_running_loop():
            await self._aclient.aclose()
        self._aclient = None

    def __enter__(self) -> TokenSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> TokenSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"TokenSource(mode={self._mode!r}, url={self.url!r})"
