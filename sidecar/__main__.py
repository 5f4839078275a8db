"""``python -m sidecar`` = ``cp-token-sidecar`` (the console script's entry point).

Nothing here imports the server side: without ``pip install 'cp-token[server]'`` the command
says which extra to install (exit 2) instead of failing with a traceback.
"""

import sys

from cp_token.extras import run_server_command

__all__ = ["main"]


def main() -> int:
    """Entry point of ``cp-token-sidecar``."""
    return run_server_command("cp-token-sidecar", "sidecar.cli:main")


if __name__ == "__main__":
    sys.exit(main())
