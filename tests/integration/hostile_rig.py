"""Raw-socket attacks on a real server, shared by the integration tests and
``bench/bench_hostile.py``: what an HTTP client library will not send (an endless trailer or
chunk extension, bodies that stall one byte short, many idle sockets from one address), and
the process's memory read from /proc while it happens.

Every function takes the port (and, for HTTPS, a client context) and returns what it
measured; sockets it leaves open are returned to the caller, who closes them.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "Attack",
    "idle_sockets",
    "open_socket",
    "peak_growth_kib",
    "rss_kib",
    "stalled_bodies",
    "status_of",
    "stream_after",
]

HOST = "127.0.0.1"
BLOCK = b"a" * 65536


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (``VmRSS``, ``VmHWM``)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match, text
    return int(match.group(1))


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` now, KiB."""
    return status_kib(pid, "VmRSS")


@contextlib.contextmanager
def peak_growth_kib(pid: int) -> Iterator[list[int]]:
    """Measure the peak RSS growth of ``pid`` over the block: the list gets one value, KiB
    (VmHWM after, reset to the current RSS first through /proc/<pid>/clear_refs)."""
    before = rss_kib(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    out: list[int] = []
    yield out
    out.append(status_kib(pid, "VmHWM") - before)


def open_socket(
    port: int,
    *,
    tls: ssl.SSLContext | None = None,
    source: str | None = None,
    timeout: float = 30.0,
) -> socket.socket:
    """A connected socket (TLS when ``tls``), from ``source`` (a loopback address) if given."""
    sock = socket.create_connection(
        (HOST, port), timeout=timeout, source_address=None if source is None else (source, 0)
    )
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=HOST)
    return sock


class Attack:
    """What one streaming attack measured: bytes the server took, seconds until it closed
    (``None``: still open at the end), and the first bytes it answered."""

    def __init__(self) -> None:
        self.sent = 0
        self.closed_after: float | None = None
        self.answer = b""


def stream_after(
    port: int,
    prefix: bytes,
    *,
    seconds: float,
    tls: ssl.SSLContext | None = None,
    limit: int = 1 << 34,
) -> Attack:
    """Send ``prefix``, then ``a`` bytes without end (for at most ``seconds`` or ``limit``
    bytes): an endless header, trailer field or chunk extension."""
    attack = Attack()
    start = time.monotonic()
    with open_socket(port, tls=tls) as sock:
        sock.settimeout(1.0)
        try:
            sock.sendall(prefix)
            while time.monotonic() - start < seconds and attack.sent < limit:
                sock.sendall(BLOCK)
                attack.sent += len(BLOCK)
        except (BrokenPipeError, ConnectionResetError, TimeoutError, ssl.SSLError, OSError):
            attack.closed_after = time.monotonic() - start
        with contextlib.suppress(OSError, ssl.SSLError):
            sock.settimeout(2.0)
            while chunk := sock.recv(65536):
                attack.answer += chunk
            if attack.closed_after is None:
                attack.closed_after = time.monotonic() - start
    return attack


def chunked_head(path: bytes, host: bytes = b"cp", extra: bytes = b"") -> bytes:
    """A POST head announcing a chunked body."""
    return (
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: "
        + host
        + b"\r\n"
        + extra
        + b"Transfer-Encoding: chunked\r\n\r\n"
    )


def stalled_bodies(
    port: int,
    count: int,
    size: int,
    *,
    path: bytes,
    content_type: bytes,
    tls: ssl.SSLContext | None = None,
) -> list[socket.socket]:
    """``count`` connections that each announce a ``size``-byte body and send all of it but
    the last byte; the open sockets (the caller closes them)."""
    head = (
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: "
        + HOST.encode()
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(size).encode()
        + b"\r\n\r\n"
    )
    body = b"a" * (size - 1)
    out: list[socket.socket] = []
    for _ in range(count):
        try:
            sock = open_socket(port, tls=tls)
            out.append(sock)
            sock.sendall(head)
            sock.sendall(body)
        except OSError:  # refused (503 and closed, or reset): the server kept its memory
            continue
    return out


def idle_sockets(port: int, count: int, source: str) -> list[socket.socket]:
    """``count`` connections from ``source`` that send nothing (those the server refused
    are left out)."""
    out = []
    for _ in range(count):
        try:
            out.append(open_socket(port, source=source))
        except OSError:
            break
    return out


def status_of(answer: bytes) -> int | None:
    """The status code of an HTTP answer's first line, if any."""
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    return int(match.group(1)) if match else None
