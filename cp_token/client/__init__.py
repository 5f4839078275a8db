"""The client library: how runners and MCP servers get their API token.

    source = TokenSource.from_env()        # sidecar, then the CP directly, then BOT_TOKEN
    token = source.token()                 # cached; refreshed before it expires
    httpx.Client(auth=TokenAuth(source))   # bearer on every request, one retry on a 401

Errors: :class:`TokenError` (base), :class:`TokenRejected` (401/403: not allowed, with the
server's description) and :class:`TokenUnavailable` (transient failures outlasted the
deadline).
"""

from ._auth import TokenAuth
from ._errors import TokenError, TokenRejected, TokenUnavailable
from ._grpc import grpc_channel_credentials, grpc_credentials
from ._http import FetchedToken
from ._source import SourceOptions, TokenSource

__all__ = [
    "FetchedToken",
    "SourceOptions",
    "TokenAuth",
    "TokenError",
    "TokenRejected",
    "TokenSource",
    "TokenUnavailable",
    "grpc_channel_credentials",
    "grpc_credentials",
]
