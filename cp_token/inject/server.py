"""Serving the injector: ``/mutate`` over HTTPS, the probes and metrics over HTTP.

The serving certificate is re-read when its files change (a cert-manager renewal swaps the
Secret volume's ``..data`` symlink: polled by content, see :mod:`cp_token.filewatch`), so a
renewal needs no restart. SIGTERM/SIGINT drain in-flight reviews and exit 0; a dead
background task exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette

from cp_token import __version__
from cp_token.config import ConfigError, redacted
from cp_token.filewatch import FileWatcher, watch_tls
from cp_token.inject.app import create_app, create_metrics_app
from cp_token.inject.metrics import InjectMetrics
from cp_token.inject.settings import InjectSettings
from cp_token.serving import QuietSignalsServer, ServerGroup, bind

__all__ = ["run_inject", "serve"]

log = logging.getLogger("cp_token.inject")

# Reviews take milliseconds; the API server gives a webhook at most timeoutSeconds (<= 10).
GRACEFUL_SECONDS = 10


async def serve(
    settings: InjectSettings, api_sock: socket.socket, metrics_sock: socket.socket
) -> int:
    """Serve until a signal (exit 0) or a fatal background failure (exit 1)."""
    metrics = InjectMetrics()
    watcher = FileWatcher()
    group = ServerGroup()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(watcher.run(), name="file-watcher")

        def died(t: asyncio.Task[None]) -> None:
            if not t.cancelled():
                log.error("certificate watcher stopped (%s); exiting", t.exception())
                group.stop(1)

        task.add_done_callback(died)
        try:
            yield
        finally:
            task.remove_done_callback(died)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    common = {"log_config": None, "access_log": False, "server_header": False}
    api_cfg = uvicorn.Config(
        create_app(settings, metrics, lifespan=lifespan),
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
        **common,  # type: ignore[arg-type]
    )
    try:
        api_cfg.load()
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            "CP_TOKEN_INJECT_TLS_CERT_FILE", f"certificate does not load ({exc})"
        ) from None
    assert api_cfg.ssl is not None
    for watched in watch_tls(
        api_cfg.ssl,
        ("CP_TOKEN_INJECT_TLS_CERT_FILE", settings.tls_cert_file),
        ("CP_TOKEN_INJECT_TLS_KEY_FILE", settings.tls_key_file),
    ):
        watcher.add(watched)
    api = QuietSignalsServer(api_cfg)

    def readiness() -> str | None:
        return None if api.started else "the webhook listener is starting"

    metrics_cfg = uvicorn.Config(
        create_metrics_app(metrics, readiness),
        lifespan="off",
        **common,  # type: ignore[arg-type]
    )
    host, port = api_sock.getsockname()[:2]
    m_host, m_port = metrics_sock.getsockname()[:2]
    endpoints = {"webhook": f"https://{host}:{port}/mutate", "metrics": f"http://{m_host}:{m_port}"}
    log.info("serving", extra={"fields": endpoints})
    return await group.serve((api, api_sock), (QuietSignalsServer(metrics_cfg), metrics_sock))


def run_inject(settings: InjectSettings) -> int:
    """Bind both listeners, serve, return the exit code."""
    log.info(
        "cp-token inject %s configured",
        __version__,
        extra={"fields": {"config": redacted(settings)}},
    )
    api_sock = bind("CP_TOKEN_INJECT_LISTEN_ADDR", settings.listen_host, settings.listen_port)
    try:
        metrics_sock = bind("CP_TOKEN_METRICS_ADDR", settings.metrics_host, settings.metrics_port)
    except ConfigError:
        api_sock.close()
        raise
    return asyncio.run(serve(settings, api_sock, metrics_sock))
