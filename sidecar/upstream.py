"""The sidecar's request to the CP: one HTTP/1.1 exchange through the sidecar's own client.

What to send and what the answer means are the client library's (``read_sa_token``,
``parse_token_response``, the errors, the retry policy): only the transport differs. httpx
and its dependencies (httpcore, anyio, idna, cookie and multipart support) cost every
session pod about 5 MiB of resident memory for a request made once every few minutes, so
the sidecar sends the one request it needs through its own HTTP/1.1 client,
:mod:`sidecar.egress_pool` (the one sealed mode's egress uses; the answer's bytes are parsed
by httptools, the parser of the sidecar's own server: ARCHITECTURE's "Trust boundaries"):
``GET`` with the pod's ServiceAccount token, ``Connection: close`` (a request every few
minutes: no connection is kept between fetches), no proxy (none is ever consulted), no
redirect. TLS is the ``ssl`` module's, verified against ``AMBIENT_CP_CA_FILE`` or the system
roots, and every size and time is bounded: the response head at :data:`MAX_HEAD`, the body at
:data:`MAX_BODY` (a ``Content-Length`` over it is refused before any body is read),
informational answers at a handful, the whole exchange at the timeout.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable
from typing import Protocol
from urllib.parse import quote, urlsplit

from cp_token.client import FetchedToken, TokenError, TokenUnavailable
from cp_token.client._http import (
    MAX_BODY,
    RawAnswer,
    ServiceAccountTokenFile,
    parse_token_response,
    printable,
    untrusted_certificate,
)
from cp_token.client._retry import Retrier, RetryPolicy
from cp_token.runtime.clock import Clock, SystemClock
from cp_token.runtime.errors import ConfigError
from cp_token.settings.client import TIMEOUT
from cp_token.settings.common import parse_url

from .egress_pool import MAX_HEAD, UntrustedUpstream, UpstreamError, UpstreamPool, split_base

__all__ = ["MAX_BODY", "MAX_HEAD", "TokenFetcher", "UpstreamSource"]

_HEADER_VALUE_OK = frozenset(range(0x21, 0x7F))  # visible ASCII: no CR/LF, no spaces
_TARGET_SAFE = "".join(map(chr, range(0x21, 0x7F)))  # left as is in the request target
# Fetches in flight at once: the refresher makes one at a time; a bound all the same.
MAX_CONNECTIONS = 4


class TokenFetcher(Protocol):
    """What the refresher needs of its upstream (``TokenSource`` is one too)."""

    url: str

    async def afetch_once(
        self, min_ttl: float | None = None, *, force: bool = False
    ) -> FetchedToken:
        """One attempt; raises the client library's errors."""

    async def aclose(self) -> None:
        """Release connections."""

    def sa_token_changed(self) -> bool:
        """Whether the SA token file holds another token than the one last sent."""


class UpstreamSource:
    """Fetches the pod's token from the CP (``cp_url``) with the projected SA token.

    The same construction knobs as :class:`cp_token.client.TokenSource` in direct mode:
    ``timeout`` bounds one exchange, ``deadline`` all retries of :meth:`afetch`.
    """

    def __init__(
        self,
        *,
        cp_url: str,
        sa_token_file: str,
        ca_file: str | None = None,
        timeout: float = TIMEOUT,
        deadline: float = 30.0,
        clock: Clock | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        try:
            parse_url("AMBIENT_CP_TOKEN_URL", cp_url)
        except ConfigError as exc:
            raise TokenError(str(exc)) from None
        parts = urlsplit(cp_url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.url = cp_url
        self._origin, _ = split_base(cp_url)
        self._target = quote(target, safe=_TARGET_SAFE).encode("ascii")
        self._sa_file = ServiceAccountTokenFile(sa_token_file)
        self._ca_file = ca_file
        self._pool: UpstreamPool | None = None
        self._timeout = timeout
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._retry = Retrier(RetryPolicy(deadline=deadline), self._clock, rand)

    def _client(self) -> UpstreamPool:
        """The HTTP client, made at the first fetch (the CA file is read then: a bad one is
        that fetch's error, not the constructor's)."""
        if self._pool is None:
            context = None
            if self._origin.tls:
                try:
                    context = ssl.create_default_context(cafile=self._ca_file)
                except (OSError, ValueError) as exc:
                    raise TokenError(f"cannot load the CA file {self._ca_file!r} ({exc})") from None
            # nothing is kept idle: every request says Connection: close
            self._pool = UpstreamPool(context, max_connections=MAX_CONNECTIONS, max_idle=0)
        return self._pool

    def _headers(self) -> list[tuple[bytes, bytes]]:
        token = self._sa_file.read_for_sending().encode("utf-8", "replace")
        if not set(token) <= _HEADER_VALUE_OK:
            raise TokenError(
                f"the ServiceAccount token file {self._sa_file.path!r} holds characters a "
                "bearer token cannot have"
            )
        return [
            (b"Authorization", b"Bearer " + token),
            (b"Accept", b"application/json"),
            (b"Accept-Encoding", b"identity"),
            (b"User-Agent", b"cp-token-sidecar"),
            (b"Connection", b"close"),
        ]

    async def _exchange(self, pool: UpstreamPool, headers: list[tuple[bytes, bytes]]) -> RawAnswer:
        response = await pool.request(self._origin, "GET", self._target, headers, b"")
        try:
            body = await response.read(MAX_BODY)
        finally:
            response.close()
        return RawAnswer.from_parts(response.status, response.reason, response.headers, body)

    async def afetch_once(
        self, min_ttl: float | None = None, *, force: bool = False
    ) -> FetchedToken:
        """One attempt; the CP mints afresh on every request (``min_ttl``/``force`` are for
        a sidecar upstream, which this never is)."""
        headers = self._headers()
        pool = self._client()
        started = self._clock.monotonic()
        try:
            async with asyncio.timeout(self._timeout):
                answer = await self._exchange(pool, headers)
        except UntrustedUpstream as exc:
            raise untrusted_certificate(self.url, exc.cause) from None
        except TimeoutError:
            raise TokenUnavailable(
                f"{self.url}: timed out after {self._timeout:g} s", self.url
            ) from None
        except UpstreamError as exc:
            raise TokenUnavailable(f"{self.url}: {exc}", self.url) from None
        except OSError as exc:
            detail = printable(exc.strerror or str(exc) or type(exc).__name__)
            raise TokenUnavailable(f"{self.url}: {detail}", self.url) from None
        except TokenError:
            raise
        except Exception as exc:  # nothing the parser should let through; still transient
            raise TokenUnavailable(
                f"{self.url}: the answer could not be read ({type(exc).__name__})", self.url
            ) from None
        return parse_token_response(
            answer, self.url, fetched_at=started, wall_now=self._clock.time()
        )

    async def afetch(self, min_ttl: float | None = None, *, force: bool = False) -> FetchedToken:
        """:meth:`afetch_once`, retrying transient failures until the deadline."""
        return await self._retry.acall(lambda: self.afetch_once(min_ttl, force=force))

    async def aclose(self) -> None:
        """Close the client (no connection is kept between fetches)."""
        if self._pool is not None:
            await self._pool.aclose()

    def sa_token_changed(self) -> bool:
        """Whether ``AMBIENT_SA_TOKEN_FILE`` now holds another token than the one last sent
        (after a refusal, the refresher fetches again as soon as it does)."""
        return self._sa_file.changed()
