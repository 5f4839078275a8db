"""Serving: the API port and the metrics port in one process, signals, TLS reload.

SIGTERM/SIGINT stop accepting, drain in-flight requests (uvicorn's graceful shutdown) and
exit 0. A dead background task exits 1. Certificates are re-read when their files change.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import uvicorn

from cp_token.config import ConfigError, Settings
from cp_token.filewatch import WatchedFile, watch_tls
from cp_token.service import Service
from cp_token.serving import QuietSignalsServer, ServerGroup, bind

__all__ = ["bind", "run_service", "serve"]

log = logging.getLogger(__name__)

GRACEFUL_SECONDS = 20


def _tls_reloader(s: Settings, ctx: ssl.SSLContext) -> list[WatchedFile[bytes]]:
    assert s.tls_cert_file and s.tls_key_file
    return watch_tls(
        ctx,
        ("CP_TOKEN_TLS_CERT_FILE", s.tls_cert_file),
        ("CP_TOKEN_TLS_KEY_FILE", s.tls_key_file),
    )


async def serve(service: Service, api_sock: socket.socket, metrics_sock: socket.socket) -> int:
    """Run both servers until a signal (exit 0) or a fatal background failure (exit 1)."""
    s = service.settings
    common = {"log_config": None, "access_log": False, "server_header": False}
    api_cfg = uvicorn.Config(
        service.app,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        ssl_certfile=s.tls_cert_file,
        ssl_keyfile=s.tls_key_file,
        **common,  # type: ignore[arg-type]
    )
    metrics_cfg = uvicorn.Config(service.metrics_app, lifespan="off", **common)  # type: ignore[arg-type]
    try:
        api_cfg.load()
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("CP_TOKEN_TLS_CERT_FILE", f"certificate does not load ({exc})") from None
    if s.tls and api_cfg.ssl is not None:
        for watched in _tls_reloader(s, api_cfg.ssl):
            service.watcher.add(watched)
    api, metrics = QuietSignalsServer(api_cfg), QuietSignalsServer(metrics_cfg)
    group = ServerGroup()
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
    return await group.serve((api, api_sock), (metrics, metrics_sock))


def run_service(service: Service) -> int:
    """Bind, serve, return the exit code."""
    s = service.settings
    api_sock = bind("CP_TOKEN_LISTEN_ADDR", s.listen_host, s.listen_port)
    metrics_sock = bind("CP_TOKEN_METRICS_ADDR", s.metrics_host, s.metrics_port)
    return asyncio.run(serve(service, api_sock, metrics_sock))
