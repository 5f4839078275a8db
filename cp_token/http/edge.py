"""Limits at the HTTP edge: request heads and bodies (size and time), the request bytes held
in the process, and open connections (in all and per client address).

Shared by every server of the project (CP, sidecar, injector) through
:mod:`cp_token.http.serving`; route handlers never see a request that broke these limits.

- :class:`EdgeListener` is the listening socket. It counts the connections it accepted and
  that are not closed yet, in all and per source address. At either cap it closes the
  connection that has been idle (or waiting for a request head) longest, from that address
  at the per-client cap, to admit the new one; only when none is idle is the new connection
  closed at once, inside ``accept`` itself, before any transport, protocol or TLS handshake
  is spent on it. The process never runs out of file descriptors however many connections
  are opened.
- :func:`edge_protocol` is uvicorn's HTTP protocol (httptools, or h11 without it) with the
  limits of :class:`EdgeLimits`, held by following each request's framing beside the parser
  (:class:`~cp_token.http.framing.RequestFraming`, before the parser sees the bytes): a head (with
  the trailer of a chunked body) over ``max_head_bytes`` is refused (431) and never buffered
  whole; a chunk-size line over ``max_chunk_line`` ends the connection; a connection without
  a complete head within ``head_timeout`` (from its accept, then from the first byte of each
  later head) is closed, and a body not whole within ``body_timeout`` of its head ends it
  (408); the body bytes held across all connections of the process are bounded
  (``max_buffered_bytes``: a new body is answered 503 at once when they are at the bound
  or its ``Content-Length`` does not fit, and a body that would pass it ends its
  connection, 503 too). Whether the request target was absolute-form
  (``GET http://host/path``) is recorded in the scope for :func:`absolute_form`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import importlib.util
import logging
import math
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from cp_token.http.framing import BODY, IDLE, RequestFraming, Violation

if TYPE_CHECKING:  # the sidecar serves through this module and never loads Starlette
    from starlette.types import Scope

__all__ = [
    "TARGET_EXTENSION",
    "EdgeLimits",
    "EdgeListener",
    "HttpImplementation",
    "absolute_form",
    "buffered_request_bytes",
    "edge_protocol",
    "is_edge_protocol",
]

log = logging.getLogger("cp_token.http.edge")

TARGET_EXTENSION = "cp_token.request_target"
# Connections refused within one accept() call before the event loop gets a turn again.
REFUSE_BATCH = 64
# Connections not started yet (a TLS handshake) shut down to admit new ones, whose
# descriptors the loop has not released yet; beyond it, a new connection is refused instead
# (descriptors stay within FD_RESERVE).
MAX_CLOSING = 64


def _closing_answer(status: bytes, content_type: bytes, body: bytes, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer that is never cached and closes the connection."""
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type + b"\r\n"
        b"cache-control: no-store\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"connection: close\r\n\r\n"
        + body
    )


def _json_answer(status: bytes, error: bytes, description: bytes, extra: bytes = b"") -> bytes:
    body = b'{"error":"' + error + b'","error_description":"' + description + b'"}'
    return _closing_answer(status, b"application/json", body, extra)


_431 = _closing_answer(
    b"431 Request Header Fields Too Large",
    b"text/plain; charset=utf-8",
    b"request head too large\n",
)
_400 = _json_answer(b"400 Bad Request", b"invalid_request", b"malformed HTTP request")
_ANSWERS = {
    Violation.HEAD_TOO_LARGE: _431,
    Violation.TRAILER_TOO_LARGE: _431,
    Violation.CHUNK_LINE_TOO_LONG: _json_answer(
        b"400 Bad Request", b"invalid_request", b"a chunk-size line is too long"
    ),
    Violation.BAD_FRAMING: _json_answer(
        b"400 Bad Request", b"invalid_request", b"malformed request body framing"
    ),
}
_408 = _json_answer(
    b"408 Request Timeout", b"invalid_request", b"the request body did not arrive in time"
)
_503 = _json_answer(
    b"503 Service Unavailable",
    b"temporarily_unavailable",
    b"too many request bodies in progress; retry shortly",
    b"retry-after: 1\r\n",
)


@dataclass(frozen=True)
class EdgeLimits:
    """Per-connection limits of the HTTP layer (SPEC "Hostile input and overload").

    ``max_buffered_bytes`` bounds the body bytes (framing and trailers included) held for
    requests in progress across every connection of the process, whatever server they
    reached; a request's bytes count from its head until it is over (whole, and answered).
    """

    max_head_bytes: int = 64 * 1024
    head_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_chunk_line: int = 1024
    body_timeout: float = 10.0
    max_buffered_bytes: int = 32 * 1024 * 1024


def absolute_form(scope: Scope) -> bool:
    """True when the request target was absolute-form (``GET http://host/path``).

    Our protocol records it in the scope; h11 (and any server that keeps the target as is)
    shows it as a ``raw_path`` that does not start with ``/``.
    """
    info = (scope.get("extensions") or {}).get(TARGET_EXTENSION)
    if info is not None:
        return bool(info.get("absolute_form"))
    raw_path: bytes = scope.get("raw_path") or b"/"
    return not raw_path.startswith(b"/")


class _Buffered:
    """Body bytes of requests in progress, across every connection of the process."""

    total = 0


_buffered = _Buffered()


def buffered_request_bytes() -> int:
    """Body bytes of requests in progress now, across every edge connection (for tests and
    metrics)."""
    return _buffered.total


# --- connections ------------------------------------------------------------------------


class _Client:
    """One source address: its open connections, and those of them that are idle."""

    __slots__ = ("idle", "open")

    def __init__(self) -> None:
        self.open = 0
        self.idle: dict[_Connection, None] = {}


class _Connection(socket.socket):
    """An accepted socket that leaves its listener's counts when closed (or evicted)."""

    def __init__(
        self, sock: socket.socket, listener: EdgeListener, client: str, deadline: float
    ) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.listener = listener
        self.client = client
        self.fd = self.fileno()
        self.accepted_at = time.monotonic()
        self.deadline = self.accepted_at + deadline  # of its head, TLS handshake included
        self.protocol: _EdgeProtocol | None = None
        self.counted = True  # in the listener's counts
        self.idle = True  # idle or waiting for a request head: may be closed for a new one
        self.evicted = False
        self.closed_once = False

    def close(self) -> None:
        """Close, and stop counting against the listener's caps."""
        super().close()
        if not self.closed_once:
            self.closed_once = True
            self.listener.closed(self)
            _unstarted.discard(self)
        self.protocol = None


class _Unstarted:
    """Accepted connections whose HTTP protocol has not started yet: a TLS handshake under
    way (asyncio would give it 60 s). One that is still here at its head deadline is shut
    down; a plain TCP connection leaves at once, when its protocol starts."""

    def __init__(self) -> None:
        self._by_fd: dict[int, _Connection] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, conn: _Connection) -> None:
        self._by_fd[conn.fd] = conn
        if conn.deadline < math.inf and (
            self._timer is None or self._loop is not asyncio.get_running_loop()
        ):
            self._schedule()

    def claim(self, fd: int) -> _Connection | None:
        """The protocol of ``fd`` started; its connection, if ours."""
        return self._by_fd.pop(fd, None)

    def discard(self, conn: _Connection) -> None:
        if self._by_fd.get(conn.fd) is conn:
            del self._by_fd[conn.fd]

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        first = min((conn.deadline for conn in self._by_fd.values()), default=math.inf)
        if first < math.inf:
            self._loop = asyncio.get_running_loop()
            self._timer = self._loop.call_at(first, self._expire)

    def _expire(self) -> None:
        now = time.monotonic()
        for fd, conn in list(self._by_fd.items()):
            if conn.deadline <= now:
                del self._by_fd[fd]
                log.debug("connection closed: no request head (TLS handshake) in time")
                _shut_down(conn)
        self._schedule()


def _shut_down(conn: socket.socket) -> None:
    """End a connection whose transport may not exist yet: its transport sees the end."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


_unstarted = _Unstarted()


class EdgeListener(socket.socket):
    """A listening TCP socket with caps on open accepted connections: ``max_connections``
    in all and ``max_per_client`` from one source address (0: no per-client cap).

    asyncio calls :meth:`accept` on it. At a cap, the connection idle (or waiting for a
    request head) longest is closed to admit the new one, one of the same address at the
    per-client cap; when none is, the new connection is closed inside ``accept`` itself, so
    a flood costs one accept+close per connection and never holds a file descriptor. A
    closed connection stops counting.

    Serve it with :func:`edge_protocol` (``cp_token.http.serving.edge_server``): a connection
    whose protocol has not started within ``head_timeout`` of its accept is shut down, and
    the protocol tells the listener when its connection is idle.
    """

    def __init__(
        self, family: int, *, max_connections: int, limit_name: str, max_per_client: int = 0
    ) -> None:
        super().__init__(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.limit_name = limit_name
        self.refused = 0
        self.evicted = 0
        # Seconds a connection may take to send a complete head, TLS handshake included; set
        # by the edge server that serves this socket (None: not watched here).
        self.head_timeout: float | None = None
        self._open: dict[_Connection, None] = {}
        self._idle: dict[_Connection, None] = {}  # oldest first
        self._clients: dict[str, _Client] = {}
        self._closing = 0  # evicted, not closed yet

    @property
    def open_connections(self) -> int:
        """Accepted connections not closed (nor being closed to admit another) yet."""
        return len(self._open)

    def accept(self) -> tuple[socket.socket, Any]:
        """The next connection within the caps (room made by closing an idle one if need
        be); those beyond them are closed at once."""
        for _ in range(REFUSE_BATCH):
            sock, addr = super().accept()  # BlockingIOError when none is waiting
            client = str(addr[0])
            cap = self._make_room(client)
            if cap is None:
                timeout = self.head_timeout
                # Served by another protocol (None): never known idle, so never evicted.
                conn = _Connection(sock, self, client, math.inf if timeout is None else timeout)
                self._admit(conn, idle=timeout is not None)
                _unstarted.add(conn)
                return conn, addr
            sock.close()
            self.refused += 1
            log.warning(
                "connection refused: %s reached, and no connection is idle",
                cap,
                extra={"fields": {"limit": self.limit_name}},
            )
        # More are waiting: let the loop serve the others; the socket stays readable.
        raise BlockingIOError(errno.EAGAIN, "connection limit reached")

    def _make_room(self, client: str) -> str | None:
        """None when ``client`` may have one more connection (closing an idle one to make
        room if need be), else which cap it is at."""
        per_client = self.max_per_client
        known = self._clients.get(client)
        if per_client and known is not None and known.open >= per_client:
            if not self._evict_oldest(known.idle, "from this address"):
                return f"{per_client} connections from one address"
        if len(self._open) >= self.max_connections:
            if not self._evict_oldest(self._idle, "in all"):
                return f"{self.max_connections} connections"
        return None

    def _evict_oldest(self, idle: dict[_Connection, None], which: str) -> bool:
        if not idle or self._closing >= MAX_CLOSING:
            return False
        conn = next(iter(idle))
        self._forget(conn)
        self.evicted += 1
        log.warning(
            "connection closed to admit a new one: the limit of connections %s is reached",
            which,
            extra={"fields": {"limit": self.limit_name}},
        )
        protocol = conn.protocol
        if protocol is not None:
            protocol.evict()
            # Its transport no longer watches the descriptor (abort unregisters it at once):
            # release it now, not when the loop next turns, so a burst of accepts that each
            # close an idle connection holds no more descriptors than the cap.
            conn.close()
        else:  # not started yet (TLS handshake, or the loop has not built its transport)
            conn.evicted = True
            self._closing += 1
            _unstarted.discard(conn)
            _shut_down(conn)
        return True

    def _admit(self, conn: _Connection, idle: bool) -> None:
        self._open[conn] = None
        client = self._clients.get(conn.client)
        if client is None:
            client = self._clients[conn.client] = _Client()
        client.open += 1
        conn.idle = idle
        if idle:
            self._idle[conn] = None
            client.idle[conn] = None

    def _forget(self, conn: _Connection) -> None:
        """Stop counting ``conn`` (closed, or being closed)."""
        if not conn.counted:
            return
        conn.counted = False
        del self._open[conn]
        self._idle.pop(conn, None)
        client = self._clients[conn.client]
        client.open -= 1
        client.idle.pop(conn, None)
        if not client.open:
            del self._clients[conn.client]

    def closed(self, conn: _Connection) -> None:
        """``conn`` was closed: stop counting it."""
        self._forget(conn)
        if conn.evicted:
            self._closing -= 1

    def set_idle(self, conn: _Connection, idle: bool) -> None:
        """``conn`` became idle (or waits for a request head), or busy; the idle ones are
        kept in the order they became so."""
        if conn.idle is idle or not conn.counted:
            return
        conn.idle = idle
        client = self._clients[conn.client]
        if idle:
            self._idle[conn] = None
            client.idle[conn] = None
        else:
            del self._idle[conn]
            del client.idle[conn]


# --- protocols --------------------------------------------------------------------------


class _EdgeProtocol(asyncio.Protocol):
    """The edge limits, for either uvicorn protocol below it in the MRO.

    Every read goes through a :class:`~cp_token.http.framing.RequestFraming` before the parser:
    a read that breaks a limit is not parsed at all; the connection is answered (when no
    response is under way on it) and closed. One deadline per connection, for the phase it
    is in: a head (from the accept for the first, then from a head's first byte; a head
    that waits behind a response in progress waits with it), or a body (from its head).
    Between requests uvicorn's keep-alive timeout applies. One timer is kept and re-armed
    only when it fires early, so a stream of keep-alive requests costs no timer per request.
    """

    limits: ClassVar[EdgeLimits] = EdgeLimits()
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any

    _framing: RequestFraming
    _conn: _Connection | None = None
    _held = 0  # body bytes of this connection's requests in progress (in _buffered)
    _ended = False
    _deadline: float | None = None
    _timer: asyncio.TimerHandle | None = None
    _changes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start waiting for the first head (from the accept, when the socket is ours)."""
        super().connection_made(transport)
        limits = self.limits
        self._framing = RequestFraming(limits.max_head_bytes, limits.max_chunk_line)
        sock = transport.get_extra_info("socket")
        conn = None if sock is None else _unstarted.claim(sock.fileno())
        start = self.loop.time()  # time.monotonic(), as the accept time
        if conn is not None:
            conn.protocol = self
            self._conn = conn
            start = conn.accepted_at
        self._set_deadline(start + limits.head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        """Release what this connection held; uvicorn does the rest."""
        self._release()
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._conn is not None:
            self._conn.protocol = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Follow ``data``'s framing first; parse it only when it breaks no limit."""
        if self._ended:
            return
        framing = self._framing
        problem = framing.feed(data)
        if problem is not None:
            log.warning("request refused: %s", problem.value)
            self._end(_ANSWERS[problem])
            return
        body = framing.body_bytes
        if body or framing.bodies_started:
            total = _buffered.total
            limit = self.limits.max_buffered_bytes
            # A body that cannot fit now is refused as soon as its Content-Length says so;
            # one that could never fit is the route's to refuse (413), its bytes counted.
            expected = framing.expected
            if total + body + (expected if expected <= limit else 0) > limit or (
                framing.bodies_started and total >= limit
            ):
                log.warning(
                    "request refused: %d bytes of request bodies are held, the limit", limit
                )
                self._end(_503)
                return
            _buffered.total = total + body
            self._held += body
        if framing.changes != self._changes:
            self._phase_changed()
        super().data_received(data)  # uvicorn's protocol, next in the MRO
        self._update()

    def on_response_complete(self) -> None:
        """A response is done: the connection may be idle now."""
        super().on_response_complete()  # type: ignore[misc]
        self._update()

    def evict(self) -> None:
        """Close this idle connection to admit another (the listener no longer counts it)."""
        self._ended = True
        self.transport.abort()

    def send_400_response(self, msg: str) -> None:
        """A request the HTTP parser refused (an unknown method, a control byte in a
        header): 400 in the services' JSON error format, never cached, connection closed."""
        self._end(_400)

    # --- state ------------------------------------------------------------------------------

    def _response_idle(self) -> bool:
        cycle = getattr(self, "cycle", None)
        return cycle is None or bool(cycle.response_complete)

    def _update(self) -> None:
        """After a read or a response: release the bytes of requests that are over, and tell
        the listener whether the connection is idle."""
        idle = self._framing.phase != BODY and self._response_idle()
        if idle and self._held:
            self._release()
        if self._conn is not None:
            self._conn.listener.set_idle(self._conn, idle)

    def _release(self) -> None:
        _buffered.total -= self._held
        self._held = 0

    def _end(self, answer: bytes | None) -> None:
        """Answer (when no response is under way on this connection) and close it; the
        request in progress sees a disconnect, and nothing more is read."""
        self._ended = True
        if self.transport.is_closing():
            return
        cycle = getattr(self, "cycle", None)
        pipelined = bool(getattr(self, "pipeline", None))
        if answer is not None and (
            cycle is None or cycle.response_complete or not (cycle.response_started or pipelined)
        ):
            self.transport.write(answer)
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() sees it; its send() is dropped
            cycle.message_event.set()
        self.transport.close()

    # --- deadlines --------------------------------------------------------------------------

    def _phase_changed(self) -> None:
        framing = self._framing
        self._changes = framing.changes
        if framing.phase == IDLE:
            self._deadline = None
        elif framing.phase == BODY:
            self._set_deadline(self.loop.time() + self.limits.body_timeout)
        elif framing.messages or self._deadline is None:  # the first head counts from accept
            self._set_deadline(self.loop.time() + self.limits.head_timeout)

    def _set_deadline(self, when: float) -> None:
        self._deadline = when
        timer = self._timer
        if timer is not None and timer.when() > when:
            timer.cancel()
            timer = None
        if timer is None:
            self._timer = self.loop.call_at(when, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if now < deadline:  # a later phase: wait for its own deadline
            self._timer = self.loop.call_at(deadline, self._deadline_passed)
            return
        if self._framing.phase == BODY:
            log.debug("connection closed: the request body did not arrive in time")
            self._end(_408)
        elif not self._response_idle():  # a pipelined head waits for the response first
            self._set_deadline(now + self.limits.head_timeout)
        else:
            log.debug("connection closed: no complete request head within the time limit")
            self._ended = True
            self.transport.close()


def _httptools_protocol() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class EdgeHttpToolsProtocol(_EdgeProtocol, HttpToolsProtocol):
        """uvicorn's httptools protocol with the edge limits."""

        def on_headers_complete(self) -> None:
            """Mark an absolute-form target; then uvicorn's (the app starts)."""
            if not self.url.startswith(b"/"):
                self.scope["extensions"] = {
                    **self.scope.get("extensions", {}),
                    TARGET_EXTENSION: {"absolute_form": not self.url.startswith(b"*")},
                }
            super().on_headers_complete()

    return EdgeHttpToolsProtocol


def _h11_protocol() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class EdgeH11Protocol(_EdgeProtocol, H11Protocol):
        """uvicorn's h11 protocol with the edge limits (absolute-form targets show in
        ``raw_path``)."""

    return EdgeH11Protocol


HttpImplementation = Literal["httptools", "h11"]


def is_edge_protocol(http: object) -> bool:
    """True when ``http`` (a ``uvicorn.Config(http=...)`` value) is one of ours."""
    return isinstance(http, type) and issubclass(http, _EdgeProtocol)


@functools.cache
def edge_protocol(
    limits: EdgeLimits, implementation: HttpImplementation | None = None
) -> type[asyncio.Protocol]:
    """The HTTP protocol class to give ``uvicorn.Config(http=...)`` for ``limits``
    (httptools when installed, else h11, unless ``implementation`` says)."""
    if implementation is None:
        implementation = "httptools" if importlib.util.find_spec("httptools") else "h11"
    base = _httptools_protocol() if implementation == "httptools" else _h11_protocol()
    return type(base.__name__, (base,), {"limits": limits})
