"""``cp-token``: serve, dev, get, inject.

A configuration mistake prints one line naming the variable and exits 2; never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from cp_token import __version__
from cp_token.extras import require_server_extra
from cp_token.runtime.errors import ConfigError

__all__ = ["main"]

# Commands that need `pip install 'cp-token[server]'` (`get` needs only the client).
SERVER_COMMANDS = ("serve", "dev", "inject")

# Flags of `serve` and the variables they override.
SERVE_FLAGS = {
    "listen_addr": "CP_TOKEN_LISTEN_ADDR",
    "metrics_addr": "CP_TOKEN_METRICS_ADDR",
    "url": "CP_TOKEN_URL",
    "authn": "CP_TOKEN_AUTHN",
    "minter": "CP_TOKEN_MINTER",
    "log_level": "CP_TOKEN_LOG_LEVEL",
    "log_format": "CP_TOKEN_LOG_FORMAT",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cp-token", description="Short-lived API tokens for Kubernetes session pods."
    )
    parser.add_argument("--version", action="version", version=f"cp-token {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run the CP token service (configured by environment; flags override)"
    )
    for dest, var in SERVE_FLAGS.items():
        serve.add_argument(
            f"--{dest.replace('_', '-')}", dest=dest, metavar=var, help=f"overrides {var}"
        )
    sub.add_parser("dev", help="CP + sidecar on loopback with no cluster and no IdP")
    sub.add_parser("get", help="print a valid token using the client library's resolution order")
    sub.add_parser("inject", help="run the sidecar injector (a mutating admission webhook)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cp-token`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["get"]:  # `get` has its own flags
        from cp_token.commands.get import run_get

        return run_get(argv[1:])
    args = _parser().parse_args(argv)
    if args.command in SERVER_COMMANDS:
        refused = require_server_extra(f"cp-token {args.command}")
        if refused is not None:
            return refused
    try:
        if args.command == "serve":
            from cp_token.commands.serve import main as serve_main

            overrides = {
                var: getattr(args, dest) for dest, var in SERVE_FLAGS.items() if getattr(args, dest)
            }
            return serve_main(overrides)
        if args.command == "dev":
            from cp_token.commands.dev import run_dev

            return run_dev()
        if args.command == "inject":
            from cp_token.commands.inject import main as inject_main

            return inject_main()
    except ConfigError as exc:
        print(f"cp-token: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
