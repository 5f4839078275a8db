"""What the CP and the sidecar share to serve: listening sockets and a quiet uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn

from cp_token.config import ConfigError

__all__ = ["QuietSignalsServer", "ServerGroup", "bind", "bind_listener"]

log = logging.getLogger(__name__)


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


def bind(variable: str, host: str, port: int) -> socket.socket:
    """A listening socket, or ConfigError naming the variable (address in use, bad host)."""
    try:
        return bind_listener(host, port)
    except OSError as exc:
        raise ConfigError(
            variable, f"cannot listen on {host}:{port} ({exc.strerror or exc})"
        ) from None


class ServerGroup:
    """Servers that run and stop together, e.g. an API port and a metrics port.

    One handler for SIGTERM/SIGINT stops them all (a second signal stops waiting for open
    connections); ``stop(1)`` is how a dead background task ends the process with exit 1.
    """

    def __init__(self) -> None:
        self.exit_code = 0
        self._stopping = False
        self._servers: list[QuietSignalsServer] = []

    def stop(self, code: int = 0) -> None:
        """Stop every server (gracefully; forcibly on a second call) with at least ``code``."""
        self.exit_code = max(self.exit_code, code)
        for server in self._servers:
            if server.should_exit:  # a second signal: stop waiting for connections
                server.force_exit = True
            server.should_exit = True
        self._stopping = True

    async def serve(self, *pairs: tuple[QuietSignalsServer, socket.socket]) -> int:
        """Serve each server on its socket until stopped; returns the exit code.

        The exit code is 1 when a server failed or the first (the API) never started.
        """
        self._servers = [server for server, _ in pairs]
        if self._stopping:
            self.stop(self.exit_code)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, 0)
        try:
            results = await asyncio.gather(
                *(server.serve(sockets=[sock]) for server, sock in pairs), return_exceptions=True
            )
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        for result in results:
            if isinstance(result, BaseException):
                log.error("server failed: %r", result)
                self.exit_code = 1
        if not pairs[0][0].started:
            self.exit_code = max(self.exit_code, 1)
        log.info("stopped", extra={"fields": {"exit_code": self.exit_code}})
        return self.exit_code
