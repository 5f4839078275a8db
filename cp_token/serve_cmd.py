"""``cp-token serve``: the API port and the metrics port in one process.

SIGTERM/SIGINT stop accepting, drain in-flight requests (uvicorn's graceful shutdown) and
exit 0. A dead background task exits 1. Certificates are re-read when their files change.
Both ports have the edge limits of :mod:`cp_token.serving` (head size and time, keep-alive,
``CP_TOKEN_MAX_CONNECTIONS`` on the API port, ``CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT`` on
both).
"""

from __future__ import annotations

import asyncio
import socket

from cp_token.serving import ServerGroup, TlsFiles, api_server, bind_serving, edge_server
from cp_token.wiring import Service

__all__ = ["run_service", "serve"]

GRACEFUL_SECONDS = 20


async def serve(service: Service, api_sock: socket.socket, metrics_sock: socket.socket) -> int:
    """Run both servers until a signal (exit 0) or a fatal background failure (exit 1)."""
    s = service.settings
    tls = None
    if s.tls_cert_file and s.tls_key_file:
        tls = TlsFiles(
            ("CP_TOKEN_TLS_CERT_FILE", s.tls_cert_file), ("CP_TOKEN_TLS_KEY_FILE", s.tls_key_file)
        )
    api = api_server(
        service.app, graceful_seconds=GRACEFUL_SECONDS, tls=tls, watcher=service.watcher
    )
    group = ServerGroup()
    service.on_fatal = lambda reason: group.stop(1)
    return await group.serve((api, api_sock), (edge_server(service.metrics_app), metrics_sock))


def run_service(service: Service) -> int:
    """Bind, serve, return the exit code."""
    s = service.settings
    api_sock, metrics_sock = bind_serving(
        "CP_TOKEN_LISTEN_ADDR",
        s.listen_host,
        s.listen_port,
        max_connections=s.max_connections,
        limit_name="CP_TOKEN_MAX_CONNECTIONS",
        max_per_client=s.max_connections_per_client,
        probes=("CP_TOKEN_METRICS_ADDR", s.metrics_host, s.metrics_port),
    )
    return asyncio.run(serve(service, api_sock, metrics_sock))
