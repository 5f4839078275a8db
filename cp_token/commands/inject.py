"""``cp-token inject``: ``/mutate`` over HTTPS, the probes and metrics over HTTP.

The serving certificate is re-read when its files change (a cert-manager renewal swaps the
Secret volume's ``..data`` symlink: polled by content, see :mod:`cp_token.runtime.filewatch`), so a
renewal needs no restart. SIGTERM/SIGINT drain in-flight reviews and exit 0; a dead
background task exits 1. Both ports have the edge limits of :mod:`cp_token.http.serving`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

from starlette.applications import Starlette

from cp_token import __version__
from cp_token.http import serving
from cp_token.inject.app import create_app, create_metrics_app
from cp_token.inject.metrics import InjectMetrics
from cp_token.runtime.filewatch import FileWatcher
from cp_token.runtime.logs import setup_logging
from cp_token.settings.common import redacted
from cp_token.settings.inject import InjectSettings, load_inject_settings

__all__ = ["main", "run_inject", "serve"]

log = logging.getLogger("cp_token.inject")

# Reviews take milliseconds; the API server gives a webhook at most timeoutSeconds (<= 10).
GRACEFUL_SECONDS = 10


async def serve(
    settings: InjectSettings, api_sock: socket.socket, metrics_sock: socket.socket
) -> int:
    """Serve until a signal (exit 0) or a fatal background failure (exit 1)."""
    metrics = InjectMetrics()
    watcher = FileWatcher()
    group = serving.ServerGroup()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with serving.background({"file-watcher": watcher.run()}, lambda *_: group.stop(1)):
            yield

    tls = serving.TlsFiles(
        ("CP_TOKEN_INJECT_TLS_CERT_FILE", settings.tls_cert_file),
        ("CP_TOKEN_INJECT_TLS_KEY_FILE", settings.tls_key_file),
    )
    api = serving.api_server(
        create_app(settings, metrics, lifespan=lifespan),
        graceful_seconds=GRACEFUL_SECONDS,
        tls=tls,
        watcher=watcher,
    )

    def readiness() -> str | None:
        return None if api.started else "starting"

    metrics_server = serving.edge_server(create_metrics_app(metrics, readiness))
    return await group.serve((api, api_sock), (metrics_server, metrics_sock))


def main() -> int:
    """``cp-token inject``: settings from the environment -> logging -> serve. A configuration
    mistake raises ConfigError (the CLI's exit 2)."""
    settings = load_inject_settings()
    setup_logging(settings.log_level, settings.log_format)
    return run_inject(settings)


def run_inject(settings: InjectSettings) -> int:
    """Bind both listeners, serve, return the exit code."""
    log.info(
        "cp-token inject %s configured",
        __version__,
        extra={"fields": {"config": redacted(settings)}},
    )
    api_sock, metrics_sock = serving.bind_serving(
        "CP_TOKEN_INJECT_LISTEN_ADDR",
        settings.listen_host,
        settings.listen_port,
        limit_name="the injector's connection cap",
        max_per_client=settings.max_connections_per_client,
        probes=("CP_TOKEN_METRICS_ADDR", settings.metrics_host, settings.metrics_port),
    )
    return asyncio.run(serve(settings, api_sock, metrics_sock))
