"""The sidecar's request to the CP: one HTTP/1.1 exchange over asyncio streams.

What to send and what the answer means are the client library's (``read_sa_token``,
``parse_token_response``, the errors, the retry policy): only the transport differs. httpx
and its dependencies (httpcore, anyio, h11, idna, cookie and multipart support) cost every
session pod about 5 MiB of resident memory for a request made once every few minutes, so
the sidecar speaks the one exchange it needs itself: ``GET`` with the pod's ServiceAccount
token, ``Connection: close``, no proxy (none is ever consulted), no redirect, a timeout on
the whole exchange, bounded head and body.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

from cp_token.client import FetchedToken, TokenError, TokenUnavailable
from cp_token.client._http import (
    ServiceAccountTokenFile,
    parse_token_response,
    untrusted_certificate,
)
from cp_token.client._retry import Retrier, RetryPolicy
from cp_token.runtime.clock import Clock, SystemClock
from cp_token.runtime.errors import ConfigError
from cp_token.settings.client import TIMEOUT
from cp_token.settings.common import parse_url

__all__ = ["TokenFetcher", "UpstreamSource"]

MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
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


class _Headers(Mapping[str, str]):
    """Response headers with case-insensitive lookup."""

    def __init__(self, items: dict[str, str]) -> None:
        self._items = items

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class _Answer:
    """A parsed response, read the way ``parse_token_response`` reads an httpx one."""

    def __init__(self, status: int, reason: str, headers: dict[str, str], body: bytes) -> None:
        self.status_code = status
        self.reason_phrase = reason
        self.headers = _Headers(headers)
        self._body = body

    def json(self) -> Any:
        return json.loads(self._body)


class _Malformed(Exception):
    """The bytes received are not an HTTP/1.1 response we accept."""


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, str]]:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _Malformed(f"response head over {MAX_HEAD} bytes") from None
    except asyncio.IncompleteReadError:
        raise _Malformed("connection closed before a complete response head") from None
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise _Malformed(f"not an HTTP/1.x status line: {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _Malformed("malformed header line")
        headers[name.lower()] = value.strip()
    return int(code), reason, headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _Malformed("bad chunk size") from None
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return bytes(body)
        if len(body) + size > MAX_BODY:
            raise _Malformed(f"response body over {MAX_BODY} bytes")
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise _Malformed("bad chunk terminator")


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await _read_chunked(reader)
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > MAX_BODY:
                raise _Malformed(f"unacceptable Content-Length {length[:20]!r}")
            return await reader.readexactly(int(length))
        body = await reader.read(MAX_BODY + 1)  # Connection: close delimits the body
        while len(body) <= MAX_BODY:
            more = await reader.read(MAX_BODY + 1 - len(body))
            if not more:
                return body
            body += more
        raise _Malformed(f"response body over {MAX_BODY} bytes")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise _Malformed("connection closed in the middle of the body") from None


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

    def _request(self) -> bytes:
        token = self._sa_file.read_for_sending()
        if not set(token.encode("utf-8", "replace")) <= _HEADER_VALUE_OK:
            raise TokenError(
                f"the ServiceAccount token file {self._sa_file.path!r} holds characters a "
                "bearer token cannot have"
            )
        return (
            f"GET {self._target} HTTP/1.1\r\nHost: {self._host_header}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: application/json\r\n"
            "User-Agent: cp-token-sidecar\r\nConnection: close\r\n\r\n"
        ).encode()

    async def _exchange(self, request: bytes) -> _Answer:
        context = self._ssl()
        reader, writer = await asyncio.open_connection(
            self._host,
            self._port,
            ssl=context,
            server_hostname=self._host if context is not None else None,
            limit=MAX_HEAD,
        )
        try:
            writer.write(request)
            await writer.drain()
            status, reason, headers = await _read_head(reader)
            body = await _read_body(reader, headers)
            return _Answer(status, reason, headers, body)
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
            detail = exc.strerror or str(exc) or type(exc).__name__
            raise TokenUnavailable(f"{self.url}: {detail}", self.url) from None
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
