"""Limits at the HTTP edge: request-head size and time, and open connections.

Shared by every server of the project (CP, sidecar, injector) through
:mod:`cp_token.http.serving`; route handlers never see a request that broke these limits.

- :class:`EdgeListener` is the listening socket. It counts the connections it accepted and
  that are not closed yet, and closes a new one at once beyond ``max_connections``: before
  any transport, protocol or TLS handshake is spent on it, so the process never runs out of
  file descriptors however many connections are opened.
- :func:`edge_protocol` is uvicorn's HTTP protocol (httptools, or h11 without it) with the
  head limits: a head is refused once more than ``max_head_bytes`` arrived without it
  completing (it is never buffered whole), a connection is closed when no complete head
  arrived within ``head_timeout`` (a fresh connection that sends nothing, a half head),
  and whether the request target was absolute-form (``GET http://host/path``) is recorded
  in the scope for :func:`absolute_form`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import importlib.util
import logging
import socket
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:  # the sidecar serves through this module and never loads Starlette
    from starlette.types import Scope

__all__ = [
    "TARGET_EXTENSION",
    "EdgeLimits",
    "EdgeListener",
    "HttpImplementation",
    "absolute_form",
    "edge_protocol",
    "is_edge_protocol",
]

log = logging.getLogger("cp_token.http.edge")

TARGET_EXTENSION = "cp_token.request_target"
# Connections refused within one accept() call before the event loop gets a turn again.
REFUSE_BATCH = 64


def _closing_answer(status: bytes, content_type: bytes, body: bytes) -> bytes:
    """A whole HTTP/1.1 answer that is never cached and closes the connection."""
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type + b"\r\n"
        b"cache-control: no-store\r\ncontent-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: close\r\n\r\n" + body
    )


_431 = _closing_answer(
    b"431 Request Header Fields Too Large",
    b"text/plain; charset=utf-8",
    b"request head too large\n",
)
_400 = _closing_answer(
    b"400 Bad Request",
    b"application/json",
    b'{"error":"invalid_request","error_description":"malformed HTTP request"}',
)


@dataclass(frozen=True)
class EdgeLimits:
    """Per-connection limits of the HTTP layer (SPEC "Hostile input and overload")."""

    max_head_bytes: int = 64 * 1024
    head_timeout: float = 10.0
    keep_alive_timeout: float = 5.0


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


# --- connections ------------------------------------------------------------------------


class _Connection(socket.socket):
    """An accepted socket that leaves its listener's open set when closed."""

    def __init__(
        self, sock: socket.socket, open_set: weakref.WeakSet[_Connection], deadline: float
    ) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self._open_set = open_set
        self.fd = self.fileno()
        self.accepted_at = time.monotonic()
        self.deadline = self.accepted_at + deadline

    def close(self) -> None:
        """Close, and stop counting against the listener's cap."""
        super().close()
        self._open_set.discard(self)
        _unstarted.discard(self)


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
        if self._timer is None or self._loop is not asyncio.get_running_loop():
            self._schedule()

    def claim(self, fd: int) -> float | None:
        """The protocol of ``fd`` started; when that connection was accepted, if ours."""
        conn = self._by_fd.pop(fd, None)
        return None if conn is None else conn.accepted_at

    def discard(self, conn: _Connection) -> None:
        if self._by_fd.get(conn.fd) is conn:
            del self._by_fd[conn.fd]

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        if self._by_fd:
            first = min(conn.deadline for conn in self._by_fd.values())
            self._loop = asyncio.get_running_loop()
            self._timer = self._loop.call_at(first, self._expire)

    def _expire(self) -> None:
        now = time.monotonic()
        for fd, conn in list(self._by_fd.items()):
            if conn.deadline <= now:
                del self._by_fd[fd]
                log.debug("connection closed: no request head (TLS handshake) in time")
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # its transport sees the end and closes
        self._schedule()


_unstarted = _Unstarted()


class EdgeListener(socket.socket):
    """A listening TCP socket with a cap on open accepted connections.

    asyncio calls :meth:`accept` on it; beyond the cap the new connection is closed inside
    ``accept`` itself, so a flood costs one accept+close per connection and never holds a
    file descriptor. A closed (or garbage-collected) connection stops counting.

    Serve it with :func:`edge_protocol` (``cp_token.http.serving.edge_server``): a connection
    whose protocol has not started within ``head_timeout`` of its accept is shut down.
    """

    def __init__(self, family: int, *, max_connections: int, limit_name: str) -> None:
        super().__init__(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.max_connections = max_connections
        self.limit_name = limit_name
        self.refused = 0
        # Seconds a connection may take to send a complete head, TLS handshake included; set
        # by the edge server that serves this socket (None: not watched here).
        self.head_timeout: float | None = None
        self._open: weakref.WeakSet[_Connection] = weakref.WeakSet()

    @property
    def open_connections(self) -> int:
        """Accepted connections not closed yet."""
        return len(self._open)

    def accept(self) -> tuple[socket.socket, Any]:
        """The next connection within the cap; those beyond it are closed at once."""
        for _ in range(REFUSE_BATCH):
            sock, addr = super().accept()  # BlockingIOError when none is waiting
            if len(self._open) < self.max_connections:
                timeout = self.head_timeout
                conn = _Connection(sock, self._open, timeout or 0.0)
                self._open.add(conn)
                if timeout is not None:
                    _unstarted.add(conn)
                return conn, addr
            sock.close()
            self.refused += 1
            log.warning(
                "connection refused: %d connections open, the limit (%s)",
                self.max_connections,
                self.limit_name,
            )
        # More are waiting: let the loop serve the others; the socket stays readable.
        raise BlockingIOError(errno.EAGAIN, "connection limit reached")


# --- protocols --------------------------------------------------------------------------


class _HeadLimits(asyncio.Protocol):
    """The head deadline and byte count, for either uvicorn protocol below it in the MRO.

    A head is awaited from the connection's start, and from the first byte of a later
    request on a keep-alive connection (an idle keep-alive connection is uvicorn's
    ``timeout_keep_alive``); no deadline runs while a response is being computed.

    One timer per connection is kept and re-armed only when it fires early, so a stream of
    keep-alive requests costs no timer per request.
    """

    limits: ClassVar[EdgeLimits] = EdgeLimits()
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    _in_head = False
    _head_bytes = 0  # received since the head started (a pipelined one: after its chunk)
    _head_started_mid_chunk = False
    _head_deadline: float | None = None
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start waiting for the first head (from the accept, when the socket is ours)."""
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        accepted_at = None if sock is None else _unstarted.claim(sock.fileno())
        self._head_started(since=accepted_at)

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the timer; uvicorn does the rest."""
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _head_started(self, mid_chunk: bool = False, since: float | None = None) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._head_started_mid_chunk = mid_chunk
        start = self.loop.time() if since is None else since  # both time.monotonic()
        deadline = start + self.limits.head_timeout
        self._head_deadline = deadline
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(deadline, self._head_timer_fired)

    def _head_done(self) -> None:
        self._in_head = False
        self._head_deadline = None  # the timer stays armed; it re-checks when it fires

    def _count_head_bytes(self, size: int) -> bool:
        """Add a chunk that arrived while in a head; True when that passes the limit."""
        self._head_bytes += size
        return self._head_bytes > self.limits.max_head_bytes

    def _head_timer_fired(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None or self.transport.is_closing():
            return
        if self.loop.time() < deadline:  # a later head: wait for its own deadline
            self._head_timer = self.loop.call_at(deadline, self._head_timer_fired)
            return
        log.debug("connection closed: no complete request head within the time limit")
        self.transport.close()

    def _refuse_head(self) -> None:
        """431 (when no response is under way on this connection) and close."""
        self._head_done()
        log.warning("request refused: its head is over %d bytes", self.limits.max_head_bytes)
        if not self.transport.is_closing():
            if self._response_idle():
                self.transport.write(_431)
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A request the HTTP parser refused (an unknown method, a control byte in a
        header): 400 in the services' JSON error format, never cached, connection closed."""
        if not self.transport.is_closing():
            self.transport.write(_400)
        self.transport.close()

    def _response_idle(self) -> bool:
        cycle = getattr(self, "cycle", None)
        return cycle is None or bool(cycle.response_complete)


class _HeadTooLarge(Exception):
    """Raised from the parser callback to stop parsing an oversized, complete head."""


def _httptools_protocol() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class EdgeHttpToolsProtocol(_HeadLimits, HttpToolsProtocol):
        """uvicorn's httptools protocol with the edge limits."""

        _oversized = False
        _between_messages = True

        def data_received(self, data: bytes) -> None:
            """Count the bytes of a head in progress; refuse one past the limit.

            Bytes after a finished exchange start a head, counted from this chunk on (the
            parser's ``on_message_begin`` comes within this call).
            """
            if self._in_head:
                counting = True
            else:
                counting = self._between_messages and self._response_idle()
                if counting:
                    self._head_started()
            too_large = counting and self._count_head_bytes(len(data))
            super().data_received(data)
            if too_large and self._in_head and not self._oversized:
                self._refuse_head()

        def on_message_begin(self) -> None:
            """A new head starts (inside a chunk, for a pipelined one: size unknown yet)."""
            super().on_message_begin()
            self._between_messages = False
            if not self._in_head:
                self._head_started(mid_chunk=True)

        def on_message_complete(self) -> None:
            """The request (body included) is in; what follows is the next head."""
            super().on_message_complete()
            self._between_messages = True

        def on_headers_complete(self) -> None:
            """Refuse a complete head over the limit; mark an absolute-form target."""
            received, mid_chunk = self._head_bytes, self._head_started_mid_chunk
            self._head_done()
            limit = self.limits.max_head_bytes
            if mid_chunk or received > limit:  # else the head is surely within the limit
                size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
                if size > limit:
                    self._oversized = True
                    raise _HeadTooLarge
            if not self.url.startswith(b"/"):
                self.scope["extensions"] = {
                    **self.scope.get("extensions", {}),
                    TARGET_EXTENSION: {"absolute_form": not self.url.startswith(b"*")},
                }
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            """uvicorn answers a parser error with 400; an oversized head gets 431."""
            if self._oversized:
                self._refuse_head()
            else:
                super().send_400_response(msg)

    return EdgeHttpToolsProtocol


def _h11_protocol() -> type[asyncio.Protocol]:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class EdgeH11Protocol(_HeadLimits, H11Protocol):
        """uvicorn's h11 protocol with the edge limits (h11 caps the head size itself)."""

        def data_received(self, data: bytes) -> None:
            """Any byte while no request is under way starts a head; h11 reports it whole.

            h11 caps only a head that is still incomplete; one that arrives whole in a
            single read is measured here, from h11's unparsed bytes plus ``data``.
            """
            if self.conn.their_state is h11.IDLE and self._response_idle():
                if not self._in_head:
                    self._head_started()
                pending = self.conn.trailing_data[0] + data
                end = pending.find(b"\r\n\r\n")
                if (end + 4 if end >= 0 else len(pending)) > self.limits.max_head_bytes:
                    self._refuse_head()
                    return
            super().data_received(data)
            if self._in_head and self.conn.their_state is not h11.IDLE:
                self._head_done()

    return EdgeH11Protocol


HttpImplementation = Literal["httptools", "h11"]


def is_edge_protocol(http: object) -> bool:
    """True when ``http`` (a ``uvicorn.Config(http=...)`` value) is one of ours."""
    return isinstance(http, type) and issubclass(http, _HeadLimits)


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
