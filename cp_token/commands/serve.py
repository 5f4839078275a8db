"""``cp-token serve``: the API port and the metrics port in one process.

SIGTERM/SIGINT stop accepting, drain in-flight requests (uvicorn's graceful shutdown) and
exit 0. A dead background task exits 1. Certificates are re-read when their files change.
Both ports have the edge limits of :mod:`cp_token.http.serving` (head size and time, keep-alive,
``CP_TOKEN_MAX_CONNECTIONS`` on the API port, ``CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT`` on
both).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping

from cp_token.http.serving import ServerGroup, TlsFiles, api_server, bind_serving, edge_server
from cp_token.runtime.logs import setup_logging
from cp_token.settings.common import is_loopback_host
from cp_token.settings.cp import Settings, load_settings
from cp_token.wiring import Service, build_service

__all__ = ["main", "plaintext_warning", "run_service", "serve"]

log = logging.getLogger("cp_token.serve")


def plaintext_warning(s: Settings) -> str | None:
    """The start-up warning for an API port serving plain HTTP beyond loopback, else None."""
    if (s.tls_cert_file and s.tls_key_file) or is_loopback_host(s.listen_host):
        return None
    return (
        f"serving plain HTTP on {s.listen_host}:{s.listen_port}: ServiceAccount tokens and "
        "minted API tokens cross the network in clear text, readable by anyone on the path; "
        "set CP_TOKEN_TLS_CERT_FILE and CP_TOKEN_TLS_KEY_FILE (k8s/base does), or keep it to a "
        "network that encrypts pod traffic (a mesh)"
    )


GRACEFUL_SECONDS = 20


async def serve(
    service: Service,
    api_sock: socket.socket,
    metrics_sock: socket.socket,
    group: ServerGroup | None = None,
) -> int:
    """Run both servers until a signal (exit 0) or a fatal background failure (exit 1): the
    ``group`` whose stop the service was built with (see :func:`main`)."""
    s = service.settings
    warning = plaintext_warning(s)
    if warning is not None:
        log.warning(warning)
    tls = None
    if s.tls_cert_file and s.tls_key_file:
        tls = TlsFiles(
            ("CP_TOKEN_TLS_CERT_FILE", s.tls_cert_file), ("CP_TOKEN_TLS_KEY_FILE", s.tls_key_file)
        )
    api = api_server(
        service.app, graceful_seconds=GRACEFUL_SECONDS, tls=tls, watcher=service.watcher
    )
    group = group or ServerGroup()
    return await group.serve((api, api_sock), (edge_server(service.metrics_app), metrics_sock))


def main(overrides: Mapping[str, str] | None = None) -> int:
    """``cp-token serve``: settings (environment, flags override) -> logging -> the wired
    service -> both listeners. A configuration mistake raises ConfigError (the CLI's exit 2)."""
    settings = load_settings(overrides=dict(overrides or {}))
    setup_logging(settings.log_level, settings.log_format)
    group = ServerGroup()  # first: the service is built with its stop as on_fatal
    return run_service(build_service(settings, on_fatal=lambda reason: group.stop(1)), group)


def run_service(service: Service, group: ServerGroup | None = None) -> int:
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
    return asyncio.run(serve(service, api_sock, metrics_sock, group))
