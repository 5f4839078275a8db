"""The sidecar's request to the CP: one HTTP/1.1 exchange, parsed by ``h11``.

What to send and what the answer means are the client library's (``read_sa_token``,
``parse_token_response``, the errors, the retry policy): only the transport differs. httpx
and its dependencies (httpcore, anyio, idna, cookie and multipart support) cost every
session pod about 5 MiB of resident memory for a request made once every few minutes, so
the sidecar drives the one exchange it needs itself: ``GET`` with the pod's ServiceAccount
token, ``Connection: close``, no proxy (none is ever consulted), no redirect. The bytes of
the answer are parsed by ``h11`` (the maintained HTTP/1.1 parser under httpx and uvicorn:
ARCHITECTURE's "Trust boundaries"), TLS is the ``ssl`` module's through asyncio streams,
and every size and time is bounded: the head (and each chunk-size line, trailer included)
at :data:`MAX_HEAD`, the body at :data:`MAX_BODY` (a ``Content-Length`` over it is refused
before any body is read), informational answers at a handful, the whole exchange at the
timeout.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable, Iterable
from typing import Protocol
from urllib.parse import urlsplit

import h11

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

__all__ = ["MAX_BODY", "MAX_HEAD", "TokenFetcher", "UpstreamSource"]

MAX_HEAD = 64 * 1024
MAX_INFORMATIONAL = 8  # 1xx answers skipped before the real one; more is a malformed answer
READ_SIZE = 64 * 1024
_HEADER_VALUE_OK = frozenset(range(0x21, 0x7F))  # visible ASCII: no CR/LF, no spaces


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


class _Malformed(Exception):
    """The bytes received are not an HTTP/1.1 answer we accept (a fixed message: never
    the answer's own bytes)."""


def _protocol_error(exc: h11.ProtocolError) -> _Malformed:
    # h11's messages quote the offending bytes after a colon; keep only what went wrong.
    what = str(exc).partition(":")[0].strip()[:80] or type(exc).__name__
    return _Malformed(f"malformed HTTP answer ({what})")


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The declared body length (h11 has checked it is ASCII digits and consistent)."""
    for name, value in headers:
        if name == b"content-length":
            if len(value) > 12:  # over a terabyte: no need to convert it to know
                raise _Malformed(f"response body over {MAX_BODY} bytes (Content-Length)")
            return int(value)
    return None


async def _read_answer(reader: asyncio.StreamReader, conn: h11.Connection) -> RawAnswer:
    """Feed ``conn`` from ``reader`` until one whole response has arrived, bounded."""
    response: h11.Response | None = None
    body = bytearray()
    informational = 0
    received = 0  # bytes fed to h11 so far
    while True:
        try:
            event = conn.next_event()
        except h11.ProtocolError as exc:
            raise _protocol_error(exc) from None
        if event is h11.NEED_DATA:
            data = await reader.read(READ_SIZE)
            if not data and response is None:
                raise _Malformed("connection closed before a complete response head")
            received += len(data)
            try:
                conn.receive_data(data)  # b"": the peer closed (h11 then decides)
            except h11.ProtocolError as exc:
                raise _protocol_error(exc) from None
            continue
        if isinstance(event, h11.InformationalResponse | h11.Response) and (
            received - len(conn.trailing_data[0]) > MAX_HEAD
        ):  # h11 bounds a head still incomplete; this bounds one that came whole
            raise _Malformed(f"response head over {MAX_HEAD} bytes")
        if isinstance(event, h11.InformationalResponse):
            informational += 1
            if informational > MAX_INFORMATIONAL:
                raise _Malformed("too many informational (1xx) answers")
        elif isinstance(event, h11.Response):
            length = _content_length(event.headers)
            if length is not None and length > MAX_BODY:
                raise _Malformed(f"response body over {MAX_BODY} bytes (Content-Length)")
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _Malformed(f"response body over {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None  # h11 orders the events
            return RawAnswer.from_h11(
                response.status_code, response.reason, response.headers, bytes(body)
            )
        elif isinstance(event, h11.ConnectionClosed):
            raise _Malformed("connection closed before a complete response")
        else:  # PAUSED cannot happen before the response ends; anything else is not ours
            raise _Malformed(f"unexpected HTTP event {type(event).__name__}")


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
        self.url = cp_url
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._host_header = parts.netloc
        self._sa_file = ServiceAccountTokenFile(sa_token_file)
        self._ca_file = ca_file
        self._context: ssl.SSLContext | None = None
        self._timeout = timeout
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._retry = Retrier(RetryPolicy(deadline=deadline), self._clock, rand)

    def _ssl(self) -> ssl.SSLContext | None:
        if not self._tls:
            return None
        if self._context is None:
            try:
                self._context = ssl.create_default_context(cafile=self._ca_file)
            except (OSError, ValueError) as exc:
                raise TokenError(f"cannot load the CA file {self._ca_file!r} ({exc})") from None
        return self._context

    def _request(self) -> h11.Request:
        token = self._sa_file.read_for_sending()
        if not set(token.encode("utf-8", "replace")) <= _HEADER_VALUE_OK:
            raise TokenError(
                f"the ServiceAccount token file {self._sa_file.path!r} holds characters a "
                "bearer token cannot have"
            )
        return h11.Request(
            method="GET",
            target=self._target,
            headers=[
                ("Host", self._host_header),
                ("Authorization", f"Bearer {token}"),
                ("Accept", "application/json"),
                ("Accept-Encoding", "identity"),
                ("User-Agent", "cp-token-sidecar"),
                ("Connection", "close"),
            ],
        )

    async def _exchange(self, request: h11.Request) -> RawAnswer:
        context = self._ssl()
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        data = conn.send(request) or b""
        reader, writer = await asyncio.open_connection(
            self._host,
            self._port,
            ssl=context,
            server_hostname=self._host if context is not None else None,
            limit=READ_SIZE,
        )
        try:
            writer.write(data + (conn.send(h11.EndOfMessage()) or b""))
            await writer.drain()
            return await _read_answer(reader, conn)
        finally:
            writer.close()

    async def afetch_once(
        self, min_ttl: float | None = None, *, force: bool = False
    ) -> FetchedToken:
        """One attempt; the CP mints afresh on every request (``min_ttl``/``force`` are for
        a sidecar upstream, which this never is)."""
        request = self._request()
        started = self._clock.monotonic()
        try:
            async with asyncio.timeout(self._timeout):
                answer = await self._exchange(request)
        except ssl.SSLCertVerificationError as exc:
            raise untrusted_certificate(self.url, exc) from None
        except TimeoutError:
            raise TokenUnavailable(
                f"{self.url}: timed out after {self._timeout:g} s", self.url
            ) from None
        except _Malformed as exc:
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
        """Nothing held between fetches (one connection per fetch)."""

    def sa_token_changed(self) -> bool:
        """Whether ``AMBIENT_SA_TOKEN_FILE`` now holds another token than the one last sent
        (after a refusal, the refresher fetches again as soon as it does)."""
        return self._sa_file.changed()
