"""Which commands need the ``server`` extra, and the one-line refusal when it is missing.

``pip install cp-token`` installs the client library and ``cp-token get`` (httpx and its
own dependencies only); ``pip install 'cp-token[server]'`` adds what ``serve``, ``dev``,
``inject`` and ``cp-token-sidecar`` need. A command run without its extra says which extra
to install and exits 2, never a traceback. Stdlib only: this runs before anything heavy.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence

__all__ = [
    "EXIT_MISSING_EXTRA",
    "SERVER_MODULES",
    "missing_server_modules",
    "require_server_extra",
    "run_server_command",
]

EXIT_MISSING_EXTRA = 2

# Top-level import names of the `server` extra's distributions (pyproject.toml), in the
# order a refusal names them; a unit test keeps this in step with pyproject.toml.
SERVER_MODULES = {
    "starlette": "starlette",
    "uvicorn": "uvicorn",
    "httptools": "httptools",
    "kubernetes": "kubernetes",
    "aiohttp": "aiohttp",
    "prometheus-client": "prometheus_client",
    "joserfc": "joserfc",
    "cachetools": "cachetools",
    "cryptography": "cryptography",
    "sniffio": "sniffio",
}


def missing_server_modules(modules: Sequence[str] | None = None) -> list[str]:
    """The server extra's modules that cannot be found (without importing any of them)."""
    missing = []
    for name in SERVER_MODULES.values() if modules is None else modules:
        try:
            found = name in sys.modules or importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def _refuse(prog: str, module: str) -> int:
    print(
        f"{prog}: needs the 'server' extra (module {module!r} is not installed): "
        "pip install 'cp-token[server]'",
        file=sys.stderr,
    )
    return EXIT_MISSING_EXTRA


def require_server_extra(prog: str) -> int | None:
    """None when the server extra is installed; else print one line naming it, return 2."""
    missing = missing_server_modules()
    return _refuse(prog, missing[0]) if missing else None


def run_server_command(prog: str, target: str, *args: object) -> int:
    """Import ``target`` (``module:function``) and call it with ``args``; when the server
    extra is missing, print one line naming it and return 2 instead."""
    refused = require_server_extra(prog)
    if refused is not None:
        return refused
    module_name, _, func_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # a dependency of a dependency, say
        if exc.name is None or exc.name.partition(".")[0] in ("cp_token", "sidecar"):
            raise
        return _refuse(prog, exc.name)
    func: Callable[..., int] = getattr(module, func_name)
    return func(*args)
