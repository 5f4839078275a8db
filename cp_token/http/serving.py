"""What every server of the project (the CP, the sidecar, the injector) shares: listeners and
uvicorn servers with the edge limits (:mod:`cp_token.http.edge`), the file-descriptor budget,
HTTPS with certificate reload, background tasks that end the process when they die, and
one run loop with signal handling.

Use: ``api_sock, probe_sock = bind_serving(variable, host, port, probes=(...))``,
``server = api_server(app, graceful_seconds=..., tls=..., watcher=...)`` (the app's lifespan
runs ``background(jobs, on_death)``), then ``ServerGroup().serve((server, api_sock),
(edge_server(probe_app), probe_sock))`` until SIGTERM/SIGINT (exit 0), ``stop(1)`` (a dead
background task) or a failed start (exit 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import uvicorn

from cp_token.http.edge import (
    EdgeLimits,
    EdgeListener,
    HttpImplementation,
    edge_protocol,
    is_edge_protocol,
)
from cp_token.runtime.errors import ConfigError
from cp_token.settings.common import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_CLIENT

if TYPE_CHECKING:  # the sidecar serves through this module and loads neither
    from starlette.types import ASGIApp

    from cp_token.runtime.filewatch import FileWatcher

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_CONNECTIONS_PER_CLIENT",
    "FD_RESERVE",
    "PROBE_LIMIT_NAME",
    "PROBE_MAX_CONNECTIONS",
    "EdgeServer",
    "QuietSignalsServer",
    "ServerGroup",
    "TlsFiles",
    "api_server",
    "background",
    "bind",
    "bind_listener",
    "bind_probes",
    "bind_serving",
    "edge_server",
    "fit_connection_caps",
    "load_tls",
    "raise_fd_limit",
]

log = logging.getLogger("cp_token.http.serving")

# Probe and metrics ports: Prometheus and the kubelet, a handful of connections.
PROBE_MAX_CONNECTIONS = 64
PROBE_LIMIT_NAME = "the metrics port's fixed cap"
# Descriptors kept out of the connection caps: listeners, Kubernetes/IdP pools, watched
# files, logs, the interpreter's own.
FD_RESERVE = 256
MIN_CONNECTIONS = 16
# Soft RLIMIT_NOFILE to ask for when the hard limit is unlimited.
FD_TARGET_UNLIMITED = 65536
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def bind_listener(
    host: str,
    port: int,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    limit_name: str = "CP_TOKEN_MAX_CONNECTIONS",
    max_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
) -> EdgeListener:
    """A bound TCP socket for uvicorn that caps open connections, in all and from one
    source address (``max_per_client``, 0: no such cap); raises OSError (address in use,
    bad host). ``limit_name`` is what the refusal log names.

    The protocol must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on connections accepted
    from such sockets, and without it a response written in two parts waits for a delayed
    ACK (40 ms per request).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = EdgeListener(
        family,
        max_connections=max_connections,
        limit_name=limit_name,
        max_per_client=max_per_client,
    )
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


def bind(
    variable: str,
    host: str,
    port: int,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    limit_name: str = "CP_TOKEN_MAX_CONNECTIONS",
    max_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
) -> EdgeListener:
    """:func:`bind_listener`, or ConfigError naming the variable (address in use, bad host)."""
    try:
        return bind_listener(
            host,
            port,
            max_connections=max_connections,
            limit_name=limit_name,
            max_per_client=max_per_client,
        )
    except OSError as exc:
        raise ConfigError(
            variable, f"cannot listen on {host}:{port} ({exc.strerror or exc})"
        ) from None


def bind_probes(
    variable: str,
    host: str,
    port: int,
    *,
    max_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
) -> EdgeListener:
    """:func:`bind` for a probe and metrics port (its own small, fixed cap)."""
    return bind(
        variable,
        host,
        port,
        max_connections=PROBE_MAX_CONNECTIONS,
        limit_name=PROBE_LIMIT_NAME,
        max_per_client=max_per_client,
    )


def bind_serving(
    variable: str,
    host: str,
    port: int,
    *,
    limit_name: str,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    probes: tuple[str, str, int] | None = None,
) -> list[EdgeListener]:
    """The serving listener, then the probe listener when ``probes`` = ``(variable, host,
    port)`` is given, both with the per-client cap ``max_per_client`` (0: none);
    ConfigError naming the variable when one cannot be bound (none is left open then)."""
    sockets = [
        bind(
            variable,
            host,
            port,
            max_connections=max_connections,
            limit_name=limit_name,
            max_per_client=max_per_client,
        )
    ]
    if probes is not None:
        try:
            sockets.append(bind_probes(*probes, max_per_client=max_per_client))
        except ConfigError:
            sockets[0].close()
            raise
    return sockets


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard limit; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_TARGET_UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit to %d (%s)", target, exc)
    return FD_TARGET_UNLIMITED if soft == resource.RLIM_INFINITY else soft


def fit_connection_caps(listeners: list[EdgeListener], fd_limit: int) -> None:
    """Lower the first listener's cap so that all caps together stay ``FD_RESERVE`` below
    ``fd_limit`` (warning when it does): accepting never fails for want of a descriptor."""
    if not listeners:
        return
    primary, others = listeners[0], listeners[1:]
    budget = fd_limit - FD_RESERVE - sum(sock.max_connections for sock in others)
    if primary.max_connections > budget:
        fitted = max(MIN_CONNECTIONS, budget)
        log.warning(
            "%s=%d does not fit the open-file limit of %d; using %d",
            primary.limit_name,
            primary.max_connections,
            fd_limit,
            fitted,
        )
        primary.max_connections = fitted


class EdgeServer(uvicorn.Server):
    """uvicorn's server without its own signal capture, and with a clean forced stop.

    uvicorn re-raises a captured SIGTERM after a graceful stop (the process then dies of the
    signal, not exit 0), and two servers in one process would overwrite each other's
    handlers: :class:`ServerGroup` installs one handler that stops them all.
    """

    def __init__(self, config: uvicorn.Config, limits: EdgeLimits | None = None) -> None:
        super().__init__(config)
        self.limits = limits or EdgeLimits()
        self._edge = is_edge_protocol(config.http)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """No signal capture: the caller handles signals."""
        yield

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's serve; our listeners learn the head deadline (it bounds TLS handshakes,
        and only the edge protocol tells the listener that a connection's HTTP started)."""
        for sock in sockets or []:
            if isinstance(sock, EdgeListener):
                sock.head_timeout = self.limits.head_timeout if self._edge else None
        await super().serve(sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown; a forced one (second signal) still stops the application.

        uvicorn skips the lifespan shutdown when forced; the lifespan task is then cancelled
        when the loop closes and logs a ``CancelledError`` traceback at error level, and the
        app's background tasks are never stopped in order.
        """
        await super().shutdown(sockets)
        done = getattr(self.lifespan, "shutdown_event", None)  # LifespanOn only
        if self.force_exit and done is not None and not done.is_set():
            await self.lifespan.shutdown()


QuietSignalsServer = EdgeServer  # the earlier name


def edge_server(
    app: ASGIApp,
    *,
    lifespan: Literal["on", "off"] = "off",
    limits: EdgeLimits | None = None,
    graceful_seconds: float = 20.0,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    http: HttpImplementation | None = None,
) -> EdgeServer:
    """A uvicorn server for ``app`` with the edge limits (head size and time, keep-alive).

    The connection cap belongs to the socket: serve it one from :func:`bind_listener`.
    """
    limits = limits or EdgeLimits()
    config = uvicorn.Config(
        app,
        http=edge_protocol(limits, http),
        lifespan=lifespan,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]  # a float works
        timeout_graceful_shutdown=graceful_seconds,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=limits.max_head_bytes,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )
    return EdgeServer(config, limits)


def load_tls(server: EdgeServer) -> ssl.SSLContext | None:
    """Load the server's configuration now (certificates included) and return its TLS
    context; raises ``ssl.SSLError``/``OSError`` for a certificate that does not load."""
    server.config.load()
    return server.config.ssl


@dataclass(frozen=True)
class TlsFiles:
    """A serving certificate and its key, each as ``(variable, path)``."""

    cert: tuple[str, str]
    key: tuple[str, str]


def api_server(
    app: ASGIApp,
    *,
    graceful_seconds: float,
    tls: TlsFiles | None = None,
    watcher: FileWatcher | None = None,
) -> EdgeServer:
    """The serving port's server: :func:`edge_server` with the app's lifespan, over HTTPS
    when ``tls`` is given. The certificate loads now (else ConfigError naming its variable)
    and, with a ``watcher``, is re-read when its files change."""
    server = edge_server(
        app,
        lifespan="on",
        graceful_seconds=graceful_seconds,
        ssl_certfile=None if tls is None else tls.cert[1],
        ssl_keyfile=None if tls is None else tls.key[1],
    )
    if tls is None:
        return server
    try:
        context = load_tls(server)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(tls.cert[0], f"certificate does not load ({exc})") from None
    if watcher is not None and context is not None:
        watcher.watch_tls(context, tls.cert, tls.key)
    return server


@contextlib.asynccontextmanager
async def background(
    jobs: Mapping[str, Coroutine[Any, Any, None]],
    on_death: Callable[[str, BaseException], None],
    *,
    may_return: Collection[str] = (),
) -> AsyncIterator[None]:
    """Run ``jobs`` (name -> coroutine) as tasks while the context is open; cancel and await
    them when it closes.

    A job that raises, or returns unless it is named in ``may_return``, is logged and
    reported to ``on_death(name, exception)``: a server is not left serving half-alive.
    """
    tasks = {asyncio.create_task(coro, name=name): name for name, coro in jobs.items()}

    def died(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        name, exc = tasks[task], task.exception()
        if exc is None and name in may_return:
            return
        exc = exc or RuntimeError(f"{name} returned")
        log.error("background task %s stopped (%r); exiting", name, exc, exc_info=exc)
        on_death(name, exc)

    for task in tasks:
        task.add_done_callback(died)
    try:
        yield
    finally:
        for task in tasks:
            task.remove_done_callback(died)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def endpoint(server: uvicorn.Server, sock: socket.socket) -> str:
    """``scheme://host:port`` of a server on its socket, for the log."""
    host, port = sock.getsockname()[:2]
    scheme = "https" if server.config.ssl_certfile else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class ServerGroup:
    """Servers that run and stop together, e.g. an API port and a metrics port.

    One handler for SIGTERM/SIGINT stops them all gracefully (exit 0); a second signal stops
    waiting for open connections (the apps are still shut down in order). ``stop(1)`` is
    how a dead background task ends the process with exit 1; a server that fails to start
    stops the others with exit 1 too.
    """

    def __init__(self) -> None:
        self.exit_code = 0
        self._stopping = False
        self._servers: list[uvicorn.Server] = []

    def stop(self, code: int = 0) -> None:
        """Stop every server (gracefully; forcibly on a second call) with at least ``code``."""
        self.exit_code = max(self.exit_code, code)
        force = self._stopping
        self._stopping = True
        for server in self._servers:
            server.should_exit = True
            if force:
                server.force_exit = True

    async def _serve_one(self, server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            await server.serve(sockets=[sock])
        except SystemExit:  # uvicorn's way out of a failed start (its reason is logged)
            pass
        except Exception as exc:
            log.error("server failed: %r", exc)
            server.started = False
        if not server.started:
            self.stop(1)

    async def serve(self, *pairs: tuple[uvicorn.Server, socket.socket]) -> int:
        """Serve each server on its socket until stopped; returns the exit code.

        The first pair is the primary: its connection cap gives way first when file
        descriptors are short (see :func:`fit_connection_caps`).
        """
        self._servers = [server for server, _ in pairs]
        if self._stopping:  # stopped before serving: keep it
            for server in self._servers:
                server.should_exit = True
        listeners = [sock for _, sock in pairs if isinstance(sock, EdgeListener)]
        fit_connection_caps(listeners, raise_fd_limit())
        urls = [endpoint(server, sock) for server, sock in pairs]
        log.info("serving", extra={"fields": {"listeners": urls}})
        loop = asyncio.get_running_loop()
        for sig in HANDLED_SIGNALS:
            loop.add_signal_handler(sig, self.stop, 0)
        try:
            await asyncio.gather(*(self._serve_one(server, sock) for server, sock in pairs))
        finally:
            for sig in HANDLED_SIGNALS:
                loop.remove_signal_handler(sig)
        log.info("stopped", extra={"fields": {"exit_code": self.exit_code}})
        return self.exit_code
