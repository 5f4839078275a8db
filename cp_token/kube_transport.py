"""HTTP/1.1 to the API server from worker threads: a bounded pool of keep-alive connections.

What :class:`cp_token.kube.KubeClient` sends is small and regular (a TokenReview, a GET of
one object): here a request is written in one piece and the answer is parsed by httptools'
C parser (chunked bodies included), so a call costs a few Python calls besides the TLS
record layer (OpenSSL). Measured against urllib3 on the same threads: its per-request
objects and http.client's header parsing (the email package) were most of the CP's own CPU
per cold TokenReview.

- One connection per caller at a time; at most ``maxsize`` connections (the Kubernetes
  worker pool's size, so a caller never waits for one); idle connections are kept for reuse.
- A reused connection that the server closed meanwhile is noticed before it is used, and a
  request that fails on a reused connection before any answer arrived is sent once more on a
  new one (the calls made here have no side effects: GETs, TokenReview, access reviews).
- Every exchange has a deadline (``timeout``, connecting included, at most
  ``connect_timeout`` for that); bodies are bounded (``MAX_BODY_BYTES``). Proxy variables
  are never read.
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

import httptools

__all__ = ["MAX_BODY_BYTES", "KubeTransport", "TransportError", "TransportTimeout"]

MAX_BODY_BYTES = 16 * 1024 * 1024
_RECV = 64 * 1024


class TransportError(Exception):
    """The exchange failed (connection refused or reset, TLS, a malformed answer)."""


class TransportTimeout(TransportError):
    """No complete answer within the deadline."""


class _Answer:
    """httptools callbacks: collect one response's body."""

    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False
        self.keep_alive = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_headers_complete(self) -> None:
        # llhttp knows whether the connection stays open only until the message completes
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size <= MAX_BODY_BYTES:
            self.body.append(data)

    def on_message_complete(self) -> None:
        self.complete = True


class _Stale(TransportError):
    """A reused connection failed before any byte of the answer arrived."""


class _Connection:
    """One (TLS) connection; used by one thread at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.used = False

    def dropped(self) -> bool:
        """True when the server closed it (or sent something unasked) while it was idle."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class KubeTransport:
    """Requests to one API server (``url``: scheme, host, port and an optional path prefix)."""

    def __init__(
        self,
        url: str,
        ssl_context: ssl.SSLContext | None,
        *,
        maxsize: int,
        timeout: float,
        connect_timeout: float,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._tls = ssl_context if parts.scheme == "https" else None
        if parts.scheme == "https" and self._tls is None:
            raise ValueError("an https URL needs a TLS context")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self._host_header = parts.netloc.rpartition("@")[2]
        self.timeout = timeout
        self._connect_timeout = min(connect_timeout, timeout)
        # Idle connections, or None for a slot no connection holds yet (as urllib3 does).
        self.pool: queue.LifoQueue[_Connection | None] = queue.LifoQueue(maxsize)
        for _ in range(maxsize):
            self.pool.put(None)
        self._closed = False

    def close(self) -> None:
        """Close the idle connections; one in use is closed when it is given back."""
        self._closed = True
        while True:
            try:
                conn = self.pool.get_nowait()
            except queue.Empty:
                return
            if conn is not None:
                conn.close()

    def request(
        self, method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes | None
    ) -> tuple[int, bytes]:
        """One exchange: ``(status, body)``; raises :class:`TransportError`."""
        deadline = time.monotonic() + self.timeout
        head = [f"{method} {self._prefix}{path} HTTP/1.1", f"Host: {self._host_header}"]
        head += [f"{name}: {value}" for name, value in headers]
        if body is not None:
            head.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b"")
        try:
            conn = self.pool.get(timeout=self.timeout)
        except queue.Empty:
            raise TransportTimeout("no free connection to the API server") from None
        try:
            conn, answer = self._exchange(conn, data, deadline)
        except BaseException:
            self.pool.put(None)
            raise
        if conn is not None and self._closed:
            conn.close()
            conn = None
        self.pool.put(conn)
        return answer

    def _exchange(
        self, conn: _Connection | None, data: bytes, deadline: float
    ) -> tuple[_Connection | None, tuple[int, bytes]]:
        """Send on ``conn`` (a new one if None or dropped); once more on a new connection when
        a reused one turns out stale. Returns the connection to keep (None: closed)."""
        if conn is not None and conn.dropped():
            conn.close()
            conn = None
        for _ in range(2):
            if conn is None:
                conn = self._connect(deadline)
            try:
                status, body, keep = self._send(conn, data, deadline)
            except _Stale:
                conn.close()
                conn = None
                continue
            except BaseException:
                conn.close()
                raise
            conn.used = True
            if not keep:
                conn.close()
                return None, (status, body)
            return conn, (status, body)
        raise TransportError("the API server closed the connection")

    def _connect(self, deadline: float) -> _Connection:
        timeout = min(self._connect_timeout, _remaining(deadline))
        try:
            sock = socket.create_connection((self._host, self._port), timeout=timeout)
        except TimeoutError:
            raise TransportTimeout("connecting to the API server timed out") from None
        except OSError as exc:
            raise TransportError(f"cannot connect ({type(exc).__name__})") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is not None:
            try:
                sock.settimeout(_remaining(deadline))
                sock = self._tls.wrap_socket(sock, server_hostname=self._host)
            except TimeoutError:
                sock.close()
                raise TransportTimeout("the TLS handshake timed out") from None
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise TransportError(f"TLS handshake failed ({type(exc).__name__})") from None
        return _Connection(sock)

    def _send(self, conn: _Connection, data: bytes, deadline: float) -> tuple[int, bytes, bool]:
        """Write the request and read the whole answer: (status, body, keep-alive)."""
        sock, answer = conn.sock, _Answer()
        parser = answer.parser = httptools.HttpResponseParser(answer)
        received = False
        try:
            sock.settimeout(_remaining(deadline))
            sock.sendall(data)
            while not answer.complete:
                sock.settimeout(_remaining(deadline))
                chunk = sock.recv(_RECV)
                if not chunk:
                    raise ConnectionResetError("closed before the answer was complete")
                received = True
                parser.feed_data(chunk)
                if answer.size > MAX_BODY_BYTES:
                    raise TransportError(f"the answer's body is over {MAX_BODY_BYTES} bytes")
        except TimeoutError:
            raise TransportTimeout("the API server did not answer in time") from None
        except (OSError, ssl.SSLError) as exc:
            if conn.used and not received:
                raise _Stale(type(exc).__name__) from None
            raise TransportError(f"connection failed ({type(exc).__name__})") from None
        except httptools.HttpParserError as exc:
            raise TransportError(f"malformed answer ({type(exc).__name__})") from None
        return parser.get_status_code(), b"".join(answer.body), answer.keep_alive


def _remaining(deadline: float) -> float:
    """Seconds left before ``deadline``; TransportTimeout when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TransportTimeout("the API server did not answer in time")
    return left
