"""``cp-token-sidecar``: serve the pod's token on loopback, or ``--once`` (init container).

Exit codes: 0 on success and on SIGTERM/SIGINT; 1 when ``--once`` cannot get a token, a
listener cannot be bound, or the refresh loop dies; 2 for a configuration mistake (one
line naming the variable, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from cp_token.client import TokenError
from cp_token.http.serving import ServerGroup, api_server, bind_serving, edge_server
from cp_token.runtime.errors import ConfigError
from cp_token.runtime.logs import setup_logging
from cp_token.settings.common import redacted
from cp_token.settings.sidecar import SidecarSettings, load_sidecar_settings

from .sink import TokenFileSink
from .upstream import UpstreamSource
from .wiring import build_sidecar

__all__ = ["main"]

PROG = "cp-token-sidecar"
# The sidecar has the CP's connection cap (its default; not configurable on its own).
LIMIT_NAME = "the sidecar's connection cap"
GRACEFUL_SECONDS = 5
log = logging.getLogger("sidecar")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Hold the pod's API token, refresh it before expiry and serve it on "
        "loopback (configuration from the environment: see docs/reference.md).",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="fetch one token, write SIDECAR_TOKEN_FILE (required) and exit (init container)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="--once: keep retrying transient failures this long (default 30)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cp-token-sidecar``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = load_sidecar_settings()
        if args.once and settings.sealed:
            raise ConfigError(
                "SIDECAR_SEALED", "--once writes a token file, which a sealed sidecar never does"
            )
        if args.once and settings.token_file is None:
            raise ConfigError(
                "SIDECAR_TOKEN_FILE", "required with --once (the file the runner reads)"
            )
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    source = UpstreamSource(
        cp_url=settings.cp_token_url,
        sa_token_file=settings.sa_token_file,
        ca_file=settings.ca_file,
        timeout=settings.timeout,
        deadline=args.deadline,
    )
    if args.once:
        return asyncio.run(run_once(settings, source))
    log.info("starting", extra={"fields": {"settings": redacted(settings)}})
    return asyncio.run(serve(settings, source))


async def run_once(settings: SidecarSettings, source: UpstreamSource) -> int:
    """Fetch one token (retrying within the deadline) and write the token file."""
    assert settings.token_file is not None
    try:
        token = await source.afetch()
    except TokenError as exc:
        print(f"{PROG}: cannot get a token: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # defence in depth: one line, never the answer's text
        print(f"{PROG}: cannot get a token: unexpected {type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        await source.aclose()
    try:
        TokenFileSink(settings.token_file, settings.token_file_mode).write(token.token)
    except OSError as exc:
        print(f"{PROG}: cannot write {settings.token_file!r}: {exc}", file=sys.stderr)
        return 1
    log.info(
        "token written",
        extra={"fields": {"path": settings.token_file, "expires_in": token.expires_in}},
    )
    return 0


async def serve(settings: SidecarSettings, source: UpstreamSource) -> int:
    """Build the sidecar, then run the token server (and the metrics server) until a signal
    or a fatal error."""
    group = ServerGroup()  # first: the sidecar is built with its stop as on_fatal
    try:  # sealed mode binds its gRPC listener while it is built
        sidecar = await build_sidecar(settings, source, on_fatal=lambda exc: group.stop(1))
    except OSError as exc:  # a busy port, as for the listeners below: exit 1
        addr = f"{settings.grpc_listen_host}:{settings.grpc_listen_port}"
        print(f"{PROG}: SIDECAR_GRPC_LISTEN_ADDR: cannot listen on {addr} ({exc})", file=sys.stderr)
        return 1
    probes = None
    if settings.metrics_host is not None and settings.metrics_port is not None:
        probes = ("SIDECAR_METRICS_ADDR", settings.metrics_host, settings.metrics_port)
    try:
        sockets = bind_serving(
            "SIDECAR_LISTEN_ADDR",
            settings.listen_host,
            settings.listen_port,
            limit_name=LIMIT_NAME,
            probes=probes,
        )
    except ConfigError as exc:  # a busy port is not a configuration mistake: exit 1
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    pairs = [(api_server(sidecar.app, graceful_seconds=GRACEFUL_SECONDS), sockets[0])]
    if len(sockets) > 1:
        probe_server = edge_server(sidecar.metrics_app, graceful_seconds=GRACEFUL_SECONDS)
        pairs.append((probe_server, sockets[1]))
    return await group.serve(*pairs)
