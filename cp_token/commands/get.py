"""``cp-token get``: print a valid token using the client library's resolution order.

Exit 0 with the token on stdout; 1 with one line on stderr when no token can be had (no
source configured included: the resolution order found nothing); 2 for a malformed value
(one line naming the variable).
"""

from __future__ import annotations

import argparse
import sys

from cp_token.client import TokenError, TokenSource
from cp_token.runtime.errors import ConfigError
from cp_token.settings.client import load_client_settings

__all__ = ["run_get"]

PROG = "cp-token get"


def run_get(argv: list[str]) -> int:
    """Run ``cp-token get`` with ``argv`` (the arguments after ``get``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Print a valid API token on stdout (from AMBIENT_TOKEN_SIDECAR_URL, "
        "else AMBIENT_CP_TOKEN_URL with AMBIENT_SA_TOKEN_FILE, else BOT_TOKEN).",
    )
    parser.add_argument(
        "--min-ttl",
        type=float,
        default=None,
        metavar="SECONDS",
        help="ask for a token with at least this many seconds left",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        settings = load_client_settings()
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if settings.source == "none":
        print(
            f"{PROG}: AMBIENT_TOKEN_SIDECAR_URL: no token source configured "
            "(set it, AMBIENT_CP_TOKEN_URL or BOT_TOKEN)",
            file=sys.stderr,
        )
        return 1
    try:
        with TokenSource.from_settings(settings) as source:
            token = source.token(min_ttl=args.min_ttl)
    except TokenError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # defence in depth: one line, never the answer's text
        print(f"{PROG}: unexpected {type(exc).__name__}", file=sys.stderr)
        return 1
    print(token)
    return 0
