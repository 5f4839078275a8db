"""Serving: the API port and the metrics port in one process, signals, TLS reload.

SIGTERM/SIGINT stop accepting, drain in-flight requests (uvicorn's graceful shutdown) and
exit 0. A dead background task exits 1. Certificates are re-read when their files change.
Both ports have the edge limits of :mod:`cp_token.serving` (head size and time, keep-alive,
``CP_TOKEN_MAX_CONNECTIONS`` on the API port).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from cp_token.config import ConfigError, Settings
from cp_token.filewatch import WatchedFile
from cp_token.service import Service
from cp_token.serving import (
    PROBE_LIMIT_NAME,
    PROBE_MAX_CONNECTIONS,
    ServeGroup,
    bind_listener,
    edge_server,
    load_tls,
)

__all__ = ["bind", "run_service", "serve"]

log = logging.getLogger(__name__)

GRACEFUL_SECONDS = 20


def bind(
    variable: str, host: str, port: int, max_connections: int, limit_name: str
) -> socket.socket:
    """A listening socket, or ConfigError naming the variable (address in use, bad host)."""
    try:
        return bind_listener(host, port, max_connections=max_connections, limit_name=limit_name)
    except OSError as exc:
        raise ConfigError(
            variable, f"cannot listen on {host}:{port} ({exc.strerror or exc})"
        ) from None


def _tls_reloader(s: Settings, ctx: ssl.SSLContext) -> list[WatchedFile[bytes]]:
    assert s.tls_cert_file and s.tls_key_file
    cert, key = s.tls_cert_file, s.tls_key_file

    def reload(_raw: bytes) -> None:
        try:
            ctx.load_cert_chain(cert, key)
            log.info("TLS certificate reloaded")
        except (ssl.SSLError, OSError) as exc:
            # Cert and key are replaced one after the other; the next change completes the pair.
            log.warning("TLS certificate reload failed (%s); keeping the previous one", exc)

    return [
        WatchedFile("CP_TOKEN_TLS_CERT_FILE", cert, bytes, on_change=reload),
        WatchedFile("CP_TOKEN_TLS_KEY_FILE", key, bytes, on_change=reload),
    ]


async def serve(service: Service, api_sock: socket.socket, metrics_sock: socket.socket) -> int:
    """Run both servers until a signal (exit 0) or a fatal background failure (exit 1)."""
    s = service.settings
    api = edge_server(
        service.app,
        lifespan="on",
        graceful_seconds=GRACEFUL_SECONDS,
        ssl_certfile=s.tls_cert_file,
        ssl_keyfile=s.tls_key_file,
    )
    metrics = edge_server(service.metrics_app)
    try:
        tls = load_tls(api)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("CP_TOKEN_TLS_CERT_FILE", f"certificate does not load ({exc})") from None
    if s.tls and tls is not None:
        for watched in _tls_reloader(s, tls):
            service.watcher.add(watched)
    group = ServeGroup()
    group.add(api, api_sock)
    group.add(metrics, metrics_sock)
    service.on_fatal = lambda reason: group.stop(1)

    scheme = "https" if s.tls else "http"
    host, port = api_sock.getsockname()[:2]
    m_host, m_port = metrics_sock.getsockname()[:2]
    log.info(
        "serving",
        extra={
            "fields": {
                "api": f"{scheme}://{host}:{port}",
                "metrics": f"http://{m_host}:{m_port}",
            }
        },
    )
    exit_code = await group.run()
    log.info("stopped", extra={"fields": {"exit_code": exit_code}})
    return exit_code


def run_service(service: Service) -> int:
    """Bind, serve, return the exit code."""
    s = service.settings
    api_sock = bind(
        "CP_TOKEN_LISTEN_ADDR",
        s.listen_host,
        s.listen_port,
        s.max_connections,
        "CP_TOKEN_MAX_CONNECTIONS",
    )
    metrics_sock = bind(
        "CP_TOKEN_METRICS_ADDR",
        s.metrics_host,
        s.metrics_port,
        PROBE_MAX_CONNECTIONS,
        PROBE_LIMIT_NAME,
    )
    return asyncio.run(serve(service, api_sock, metrics_sock))
