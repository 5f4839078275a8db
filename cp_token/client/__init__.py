"""The client library: how runners and MCP servers get their API token.

    source = TokenSource.from_env()        # sidecar, then the CP directly, then BOT_TOKEN
    token = source.token()                 # cached; refreshed before it expires
    httpx.Client(auth=TokenAuth(source))   # bearer on every request, one retry on a 401

    api = api_client("https://api.example")  # the same, and it works in a sealed pod too,
    channel = grpc_channel("api.example:443")  # where no container but the sidecar holds a token

Errors: :class:`TokenError` (base), :class:`TokenRejected` (401/403: not allowed, with the
server's description) and :class:`TokenUnavailable` (transient failures outlasted the
deadline).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import TokenError, TokenRejected, TokenUnavailable
from ._http import FetchedToken

if TYPE_CHECKING:
    from ._api import api_async_client, api_client, grpc_channel
    from ._auth import TokenAuth
    from ._grpc import grpc_channel_credentials, grpc_credentials
    from ._source import SourceOptions, TokenSource

# Imported on first use: httpx is only loaded by what fetches with it, so the sidecar (which
# uses the errors and FetchedToken, and its own small HTTP client) saves its ~5 MiB per pod.
_LAZY = {
    "SourceOptions": "._source",
    "TokenAuth": "._auth",
    "TokenSource": "._source",
    "api_async_client": "._api",
    "api_client": "._api",
    "grpc_channel": "._api",
    "grpc_channel_credentials": "._grpc",
    "grpc_credentials": "._grpc",
}


def __getattr__(name: str) -> Any:
    """Load the httpx-based names on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "FetchedToken",
    "SourceOptions",
    "TokenAuth",
    "TokenError",
    "TokenRejected",
    "TokenSource",
    "TokenUnavailable",
    "api_async_client",
    "api_client",
    "grpc_channel",
    "grpc_channel_credentials",
    "grpc_credentials",
]
