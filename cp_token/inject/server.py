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
import signal
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
from cp_token.serving import QuietSignalsServer, bind_listener

__all__ = ["run_inject", "serve"]

log = logging.getLogger("cp_token.inject")

# Reviews take milliseconds; the API server gives a webhook at most timeoutSeconds (<= 10).
GRACEFUL_SECONDS = 10


def _bind(variable: str, host: str, port: int) -> socket.socket:
    try:
        return bind_listener(host, port)
    except OSError as exc:
        raise ConfigError(
            variable, f"cannot listen on {host}:{port} ({exc.strerror or exc})"
        ) from None


async def serve(
    settings: InjectSettings, api_sock: socket.socket, metrics_sock: socket.socket
) -> int:
    """Serve until a signal (exit 0) or a fatal background failure (exit 1)."""
    metrics = InjectMetrics()
    watcher = FileWatcher()
    servers: list[QuietSignalsServer] = []
    exit_code = 0

    def stop(code: int) -> None:
        nonlocal exit_code
        exit_code = max(exit_code, code)
        for server in servers:
            if server.should_exit:  # a second signal: stop waiting for connections
                server.force_exit = True
            server.should_exit = True

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(watcher.run(), name="file-watcher")

        def died(t: asyncio.Task[None]) -> None:
            if not t.cancelled():
                log.error("certificate watcher stopped (%s); exiting", t.exception())
                stop(1)

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
    servers += [api, QuietSignalsServer(metrics_cfg)]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, 0)
    host, port = api_sock.getsockname()[:2]
    m_host, m_port = metrics_sock.getsockname()[:2]
    endpoints = {"webhook": f"https://{host}:{port}/mutate", "metrics": f"http://{m_host}:{m_port}"}
    log.info("serving", extra={"fields": endpoints})
    try:
        results = await asyncio.gather(
            api.serve(sockets=[api_sock]),
            servers[1].serve(sockets=[metrics_sock]),
            return_exceptions=True,
        )
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    for result in results:
        if isinstance(result, BaseException):
            log.error("server failed: %r", result)
            exit_code = 1
    if not api.started:
        exit_code = max(exit_code, 1)
    log.info("stopped", extra={"fields": {"exit_code": exit_code}})
    return exit_code


def run_inject(settings: InjectSettings) -> int:
    """Bind both listeners, serve, return the exit code."""
    log.info(
        "cp-token inject %s configured",
        __version__,
        extra={"fields": {"config": redacted(settings)}},
    )
    api_sock = _bind("CP_TOKEN_INJECT_LISTEN_ADDR", settings.listen_host, settings.listen_port)
    try:
        metrics_sock = _bind("CP_TOKEN_METRICS_ADDR", settings.metrics_host, settings.metrics_port)
    except ConfigError:
        api_sock.close()
        raise
    return asyncio.run(serve(settings, api_sock, metrics_sock))
