"""``cp-token inject``: ``/mutate`` over HTTPS, the probes and metrics over HTTP.

The serving certificate is re-read when its files change (a cert-manager renewal swaps the
Secret volume's ``..data`` symlink: polled by content, see :mod:`cp_token.runtime.filewatch`), so a
renewal needs no restart. SIGTERM/SIGINT drain in-flight reviews and exit 0; a dead
background task exits 1. Both ports have the edge limits of :mod:`cp_token.http.serving`.
"""

from __future__ import annotations

import asyncio
import socket

from cp_token.http import serving
from cp_token.inject.wiring import Injector, build_injector
from cp_token.runtime.logs import setup_logging
from cp_token.settings.inject import InjectSettings, load_inject_settings

__all__ = ["main", "run_inject", "serve"]

# Reviews take milliseconds; the API server gives a webhook at most timeoutSeconds (<= 10).
GRACEFUL_SECONDS = 10


async def serve(
    injector: Injector,
    api_sock: socket.socket,
    metrics_sock: socket.socket,
    group: serving.ServerGroup,
) -> int:
    """Serve until a signal (exit 0) or a fatal background failure (exit 1): the ``group``
    whose stop the injector was built with."""
    api = serving.api_server(
        injector.app,
        graceful_seconds=GRACEFUL_SECONDS,
        tls=injector.tls,
        watcher=injector.watcher,
    )
    metrics_server = serving.edge_server(injector.metrics_app)
    return await group.serve((api, api_sock), (metrics_server, metrics_sock))


def main() -> int:
    """``cp-token inject``: settings from the environment -> logging -> build -> serve. A
    configuration mistake raises ConfigError (the CLI's exit 2)."""
    settings = load_inject_settings()
    setup_logging(settings.log_level, settings.log_format)
    return run_inject(settings)


def run_inject(settings: InjectSettings) -> int:
    """Build, bind both listeners, serve, return the exit code."""
    group = serving.ServerGroup()  # first: the injector is built with its stop as on_fatal
    injector = build_injector(settings, on_fatal=lambda reason: group.stop(1))
    api_sock, metrics_sock = serving.bind_serving(
        "CP_TOKEN_INJECT_LISTEN_ADDR",
        settings.listen_host,
        settings.listen_port,
        limit_name="the injector's connection cap",
        max_per_client=settings.max_connections_per_client,
        probes=("CP_TOKEN_METRICS_ADDR", settings.metrics_host, settings.metrics_port),
    )
    return asyncio.run(serve(injector, api_sock, metrics_sock, group))
