"""The sidecar's one HTTP/1.1 client: pooled keep-alive connections, for the egress routes'
calls to the upstreams (sealed mode) and for the token fetch from the CP (``upstream.py``).

Every byte a server sends is parsed by httptools (llhttp, Node.js's parser: the same one
the sidecar's own server uses for the requests it receives); TLS is the ssl module's, through
asyncio's transports, verified against the context the caller gives (a CA file or the system
roots). No proxy is ever consulted and no redirect followed: a 3xx is an answer like any
other. What is ours: writing the request (a head from headers the server already parsed, and
the body as it comes, chunked when its length is unknown), the pool, flow control both ways,
and the bounds: a response head (all of an exchange's heads, informational ones included) at
:data:`MAX_HEAD` bytes and :data:`MAX_HEADERS` lines, at most :data:`MAX_INFORMATIONAL` 1xx
answers before the real one, and :meth:`UpstreamResponse.read` for a whole body up to a limit
(a ``Content-Length`` over it is refused before any of the body is read). Time is the
caller's: it wraps a call in its deadline, and cancelling closes the connection.

Why not httpx here (it is the client library's HTTP client): measured on this machine,
httpx's AsyncClient spent 0.75-2 ms of CPU per proxied GET (h11 in pure Python, anyio's TLS
streams, a pool that polls every idle connection per request: the cost grew with
concurrency), against 0.06-0.12 ms for this client over the same TLS connection: with httpx a
sealed sidecar relayed 0.05x of what the upstream serves, added 1.37 ms at p50 and held
35.9 MiB (goal 35). See bench/bench_sealed.py and docs/design.md.

A response's body is kept to ``HIGH_WATER`` bytes before the connection stops reading (the
caller's pace sets the upstream's); a request body is written as it arrives, each write
awaited. A connection goes back to the pool only after a complete answer that keeps it alive
(a request that says ``Connection: close`` never does).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import collections
import inspect
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

__all__ = [
    "MAX_HEAD",
    "Origin",
    "UntrustedUpstream",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
    "split_base",
]

MAX_HEAD = 64 * 1024  # response head bytes (all of an exchange's heads) before it is refused
MAX_HEADERS = 256
MAX_INFORMATIONAL = 8  # 1xx answers skipped before the real one; more is a malformed answer
_HEAD_TOO_LARGE = f"response head over {MAX_HEAD} bytes from the upstream"
HIGH_WATER = 256 * 1024  # response body buffered before the upstream connection pauses
LOW_WATER = 64 * 1024
CONNECT_HANDSHAKE = 10  # the TLS handshake's own bound (the caller's deadline is shorter)
TLS_READ_BUFFER = 32 * 1024


class UpstreamError(Exception):
    """The upstream cannot be reached, or broke the exchange off. The message is a short
    reason (never a header value, never a token)."""


class UntrustedUpstream(UpstreamError):
    """The upstream's TLS certificate does not verify against the context's roots (retrying
    cannot fix that: the caller may say so differently)."""

    def __init__(self, message: str, cause: ssl.SSLCertVerificationError) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass(frozen=True)
class Origin:
    """Where an upstream is: scheme, host and port, and its ``Host`` header."""

    scheme: str
    host: str
    port: int
    host_header: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # ``host[:port]`` (the port only when it is not the scheme's default), once
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        header = host if self.port == default else f"{host}:{self.port}"
        # the idna codec only for a name outside ASCII: it loads unicodedata (~0.3 MiB)
        encoded = header.encode("ascii") if header.isascii() else header.encode("idna")
        object.__setattr__(self, "host_header", encoded)

    @property
    def tls(self) -> bool:
        """True for https."""
        return self.scheme == "https"


def split_base(url: str) -> tuple[Origin, str]:
    """A configured upstream URL (validated by the settings) as its origin and base path."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return Origin(scheme, parts.hostname or "", port), parts.path.rstrip("/")


_SSL_PROTOCOL_ARGS = frozenset(
    {"loop", "app_protocol", "sslcontext", "waiter", "server_hostname", "ssl_handshake_timeout"}
)


def _small_buffer_tls() -> type[asyncio.sslproto.SSLProtocol] | None:
    """asyncio's TLS layer (what ``create_connection(ssl=...)`` builds), reading into a
    32 KiB buffer instead of 256 KiB: a sidecar holds one per open upstream connection, and
    churning 256 KiB buffers grew a sidecar to 100 MiB under 16 concurrent calls (measured;
    32 KiB: under 50 MiB with churn, and the pool no longer churns below its cap).

    ``asyncio.sslproto.SSLProtocol`` is private: its ``max_size`` (the read buffer's size)
    and its constructor are the same on CPython 3.11, 3.12 and 3.13 (checked). On an
    interpreter where they are not as expected this returns None and connections use the
    plain ``create_connection(ssl=...)`` path (bigger buffers, same behaviour)."""
    base: object = getattr(asyncio.sslproto, "SSLProtocol", None)
    if not isinstance(base, type) or not isinstance(getattr(base, "max_size", None), int):
        return None
    try:
        params = set(inspect.signature(base).parameters)
    except (TypeError, ValueError):
        return None
    if not _SSL_PROTOCOL_ARGS <= params:
        return None
    layer = type("_TlsLayer", (base,), {"max_size": TLS_READ_BUFFER, "__module__": __name__})
    return cast("type[asyncio.sslproto.SSLProtocol]", layer)


_TLS_LAYER = _small_buffer_tls()


def _parser_reason(exc: httptools.HttpParserError) -> str:
    """llhttp's reason for refusing an answer (a fixed phrase such as "Invalid character in
    chunk size", never the answer's bytes), or the exception's name."""
    reason = str(exc)[:80]
    return reason if reason.isascii() and reason.isprintable() and reason else type(exc).__name__


class _Connection(asyncio.Protocol):
    """One connection to an upstream, reading responses with httptools."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._new_exchange(head_only=False, close=False)

    def _new_exchange(self, *, head_only: bool, close: bool) -> None:
        self.status: int | None = None
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error: str | None = None
        self.received = 0
        self._head_only = head_only
        self._close = close  # the request said "Connection: close"
        self._head_bytes = 0  # status lines and header lines parsed in this exchange
        self._informational = 0
        self._in_informational = False
        self._until_eof = False

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.status is not None and self._until_eof and self.error is None:
            self.complete = True  # a body delimited by the end of the connection
        elif not self.complete and self.error is None:
            self.error = (
                "the connection to the upstream closed before a complete response head"
                if self.status is None
                else "the connection to the upstream closed before the end of the response"
            )
        self._wake()
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("the upstream switched protocols")
        except httptools.HttpParserError as exc:
            self._fail(f"malformed response from the upstream ({_parser_reason(exc)})")
        if self.status is None and self.received > MAX_HEAD:
            # still no whole head after this many bytes (the callbacks bound one that came
            # whole in a single read)
            self._fail(_HEAD_TOO_LARGE)
            return
        if self.buffered > HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # close

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # --- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.headers = []
        self.reason = b""

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD:
            self._fail(_HEAD_TOO_LARGE)
            raise ValueError(_HEAD_TOO_LARGE)  # stops the parser; the reason is set

    def on_status(self, status: bytes) -> None:
        # the reason phrase, possibly in pieces (one per read)
        self._count_head(len(status))
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        if len(self.headers) >= MAX_HEADERS:
            self._fail(f"more than {MAX_HEADERS} header lines in the upstream's response")
            raise ValueError("too many headers")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # 103 Early Hints and the like: the answer follows
            self._in_informational = True
            self._informational += 1
            if self._informational > MAX_INFORMATIONAL:
                self._fail("too many informational (1xx) answers from the upstream")
                raise ValueError("too many informational answers")
            return
        self.status = status
        self.keep_alive = (
            bool(self._parser.should_keep_alive()) and not self._head_only and not self._close
        )
        if self._head_only:  # the parser cannot know the request was HEAD: no body follows
            self.complete = True
        names = {name.lower() for name, _ in self.headers}
        self._until_eof = (
            not self._head_only
            and status not in (204, 304)
            and b"content-length" not in names
            and b"transfer-encoding" not in names
        )
        if self._until_eof:
            self.keep_alive = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        if self._in_informational:
            self._in_informational = False
            return
        self.complete = True
        self._wake()

    # --- the exchange --------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        await waiter

    async def write(self, data: bytes) -> None:
        """Write ``data``, waiting while the transport's buffer is full."""
        if self.closed or self.transport is None:
            raise UpstreamError(self.error or "the upstream closed the connection")
        self.transport.write(data)
        while self._write_paused and not self.closed:
            drain = self._drain = asyncio.get_running_loop().create_future()
            await drain
        if self.closed and not self.complete:
            raise UpstreamError(self.error or "the upstream closed the connection")

    async def read_head(self) -> None:
        """Wait for the response head (status and headers)."""
        while self.status is None:
            if self.error is not None:
                raise UpstreamError(self.error)
            await self._wait()

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body as it arrived; None at its end."""
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                self.buffered -= len(chunk)
                if self._read_paused and self.buffered < LOW_WATER and self.transport is not None:
                    self._read_paused = False
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return None
            if self.error is not None:
                raise UpstreamError(self.error)
            await self._wait()

    def close(self) -> None:
        """Close the connection (its exchange, if any, is abandoned)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _head(
    method: str,
    target: bytes,
    origin: Origin,
    headers: list[tuple[bytes, bytes]],
    framing: tuple[bytes, bytes] | None,
) -> bytes:
    lines = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\nHost: ", origin.host_header]
    for name, value in headers:
        lines += [b"\r\n", name, b": ", value]
    if framing is not None:
        lines += [b"\r\n", framing[0], b": ", framing[1]]
    lines.append(b"\r\n\r\n")
    return b"".join(lines)


class UpstreamResponse:
    """An upstream's answer: status and headers now, the body as it arrives."""

    def __init__(self, pool: UpstreamPool, conn: _Connection) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        assert conn.status is not None
        self.status: int = conn.status
        self.reason: bytes = conn.reason
        self.headers = conn.headers

    @property
    def finished(self) -> bool:
        """True once the whole body has arrived and been read."""
        conn = self._conn
        return conn is None or (conn.complete and not conn.chunks)

    async def body(self) -> AsyncIterator[bytes]:
        """The body's pieces as they arrive (raises :class:`UpstreamError` when the upstream
        breaks it off)."""
        conn = self._conn
        if conn is None:
            return
        while (chunk := await conn.next_chunk()) is not None:
            yield chunk

    async def read(self, limit: int) -> bytes:
        """The whole body, at most ``limit`` bytes: a ``Content-Length`` over it is refused
        before any of the body is read, and a body that grows past it as it arrives
        (chunked, or delimited by the end of the connection) when it does. Raises
        :class:`UpstreamError`. The caller still closes the response."""
        for name, value in self.headers:
            if name.lower() == b"content-length":
                # llhttp has checked it is digits (and refused a second, different one)
                if len(value.strip()) > 12 or int(value) > limit:
                    raise UpstreamError(f"response body over {limit} bytes (Content-Length)")
        body = bytearray()
        async for chunk in self.body():
            body += chunk
            if len(body) > limit:
                raise UpstreamError(f"response body over {limit} bytes")
        return bytes(body)

    def close(self) -> None:
        """Done with the answer: the connection goes back to the pool when the answer was
        complete and keeps it alive, else it is closed. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn)


class UpstreamPool:
    """Keep-alive connections per origin: at most ``max_connections`` in use at once (a call
    beyond waits for one, within its caller's deadline), at most ``max_idle`` kept idle, each
    for at most ``idle_expiry`` seconds.

    Every connection below the cap is kept (a connection closed after each call would cost
    a TLS handshake per call); idle ones close after ``idle_expiry``, so a burst's
    connections (32 KiB of TLS buffer each, and OpenSSL's state) do not stay.

    ``context`` verifies https origins (None: the pool only speaks plain http, and an https
    origin is an :class:`UpstreamError`)."""

    def __init__(
        self,
        context: ssl.SSLContext | None,
        *,
        max_connections: int = 64,
        max_idle: int | None = None,
        idle_expiry: float = 15.0,
    ) -> None:
        self._context = context
        self._slots = asyncio.Semaphore(max_connections)
        self._max_idle = max_connections if max_idle is None else max_idle
        self._idle_expiry = idle_expiry
        self._idle: collections.OrderedDict[int, _Connection] = collections.OrderedDict()
        self._sweep: asyncio.TimerHandle | None = None

    async def request(
        self,
        origin: Origin,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes],
    ) -> UpstreamResponse:
        """Send the request and wait for the response head. ``headers`` are written as given
        (the ``host`` is the origin's); a ``bytes`` body gets a ``content-length`` unless the
        headers have one, an iterable one is chunked unless they do. A reused connection that
        turns out closed is replaced once, when nothing of a streamed body was consumed.
        Raises :class:`UpstreamError`; cancelling closes the connection."""
        if b" " in target or b"\r" in target or b"\n" in target or not target.startswith(b"/"):
            raise ValueError("the request target has a space or a line break")
        await self._slots.acquire()
        try:
            return await self._request(origin, method, target, headers, body)
        except BaseException:
            self._slots.release()
            raise

    async def _request(
        self,
        origin: Origin,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes],
    ) -> UpstreamResponse:
        has_length = any(name.lower() == b"content-length" for name, _ in headers)
        close = any(
            name.lower() == b"connection" and b"close" in value.lower() for name, value in headers
        )
        if isinstance(body, bytes):
            framing = None if has_length or not body else (b"content-length", b"%d" % len(body))
        else:
            framing = None if has_length else (b"transfer-encoding", b"chunked")
        head = _head(method, target, origin, headers, framing)
        for attempt in (1, 2):
            conn = self._take(origin) if attempt == 1 else None
            if conn is None:
                conn = await self._connect(origin)
            conn._new_exchange(head_only=method == "HEAD", close=close)
            started = False
            try:
                await conn.write(head)
                if isinstance(body, bytes):
                    if body:
                        await conn.write(body)
                else:
                    started = True
                    await self._stream(conn, body, chunked=framing is not None)
                await conn.read_head()
            except UpstreamError:
                conn.close()
                # a kept connection the upstream had closed meanwhile: once more, on a new one
                if attempt == 1 and conn.reused and conn.received == 0 and not started:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return UpstreamResponse(self, conn)
        raise AssertionError("unreachable")

    @staticmethod
    async def _stream(conn: _Connection, body: AsyncIterable[bytes], *, chunked: bool) -> None:
        async for chunk in body:
            if not chunk:
                continue
            if chunked:
                await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                await conn.write(chunk)
        if chunked:
            await conn.write(b"0\r\n\r\n")

    def _take(self, origin: Origin) -> _Connection | None:
        """An idle connection to ``origin`` that is still open and fresh enough."""
        now = time.monotonic()
        for key, conn in reversed(self._idle.items()):  # the most recently used first
            if conn.origin != origin:
                continue
            del self._idle[key]
            if conn.closed or now - conn.idle_since > self._idle_expiry:
                conn.close()
                return self._take(origin)
            conn.reused = True
            return conn
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        """A new connection; over TLS the way ``create_connection(ssl=...)`` builds it, with
        the small-buffer TLS layer when this interpreter's asyncio has the expected one."""
        loop = asyncio.get_running_loop()
        conn = _Connection(origin)
        transport: asyncio.BaseTransport | None = None
        context = self._context
        try:
            if not origin.tls:
                await loop.create_connection(lambda: conn, origin.host, origin.port)
                return conn
            if context is None:
                raise UpstreamError("https is not configured for this client")
            if _TLS_LAYER is None:  # asyncio's own layer, its default buffer
                await loop.create_connection(
                    lambda: conn,
                    origin.host,
                    origin.port,
                    ssl=context,
                    server_hostname=origin.host,
                    ssl_handshake_timeout=CONNECT_HANDSHAKE,
                )
                return conn
            handshake: asyncio.Future[None] = loop.create_future()
            layer = _TLS_LAYER(
                loop,
                conn,
                context,
                handshake,
                server_hostname=origin.host,
                ssl_handshake_timeout=CONNECT_HANDSHAKE,
            )
            transport, _ = await loop.create_connection(lambda: layer, origin.host, origin.port)
            await handshake
            return conn
        except ssl.SSLCertVerificationError as exc:
            raise UntrustedUpstream(
                f"the upstream's TLS certificate does not verify ({exc.verify_message or exc})",
                exc,
            ) from None
        except ssl.SSLError as exc:
            raise UpstreamError(f"TLS with the upstream failed ({exc.reason or exc})") from None
        except (OSError, ConnectionError) as exc:
            raise UpstreamError(f"cannot connect ({exc.strerror or type(exc).__name__})") from None
        finally:
            if transport is not None and conn.transport is None:
                transport.close()  # the handshake failed or was cancelled

    def release(self, conn: _Connection) -> None:
        """Take ``conn`` back after an exchange (see :meth:`UpstreamResponse.close`)."""
        self._slots.release()
        if conn.closed or not conn.complete or not conn.keep_alive:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle[id(conn)] = conn
        while len(self._idle) > self._max_idle:
            _, oldest = self._idle.popitem(last=False)
            oldest.close()
        if self._sweep is None:
            loop = asyncio.get_running_loop()
            self._sweep = loop.call_later(self._idle_expiry, self._close_expired)

    def _close_expired(self) -> None:
        """Close the connections idle for ``idle_expiry``; come back while any is left."""
        self._sweep = None
        now = time.monotonic()
        for key, conn in list(self._idle.items()):
            if conn.closed or now - conn.idle_since >= self._idle_expiry:
                del self._idle[key]
                conn.close()
        if self._idle:
            oldest = min(conn.idle_since for conn in self._idle.values())
            delay = max(0.1, oldest + self._idle_expiry - now)
            self._sweep = asyncio.get_running_loop().call_later(delay, self._close_expired)

    @property
    def idle(self) -> int:
        """Connections kept open for the next calls."""
        return len(self._idle)

    async def aclose(self) -> None:
        """Close every idle connection."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self._idle:
            _, conn = self._idle.popitem()
            conn.close()
