"""What the CP and the sidecar share to serve: listening sockets and a quiet uvicorn server."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import uvicorn

__all__ = ["QuietSignalsServer", "bind_listener"]


class QuietSignalsServer(uvicorn.Server):
    """uvicorn's server without its own signal capture.

    uvicorn re-raises a captured SIGTERM after a graceful stop (the process then dies of the
    signal, not exit 0), and two servers in one process would overwrite each other's
    handlers; the caller installs one handler that stops both.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """No signal capture: the caller handles signals."""
        yield


def bind_listener(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn (raises OSError: address in use, bad host).

    The protocol must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on connections accepted
    from such sockets, and without it a response written in two parts waits for a delayed
    ACK (40 ms per request).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual-stack "all"
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
