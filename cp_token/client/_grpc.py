"""Per-call gRPC credentials: every call reads the source's current token.

The token is cached by the source, so this is cheap, and a refreshed token is picked up by
the next call on the same channel, with no reconnect.
"""

from __future__ import annotations

from typing import Any

from ._errors import TokenError
from ._source import TokenSource

__all__ = ["grpc_channel_credentials", "grpc_credentials"]


def _grpc() -> Any:
    try:
        import grpc
    except ImportError as exc:
        raise TokenError("gRPC credentials need grpcio: pip install 'cp-token[grpc]'") from exc
    return grpc


class _BearerPlugin:
    """A ``grpc.AuthMetadataPlugin``: called by grpcio (on its own threads) per call."""

    def __init__(self, source: TokenSource) -> None:
        self._source = source

    def __call__(self, context: Any, callback: Any) -> None:
        try:
            token = self._source.token()
        except TokenError as exc:
            callback((), exc)  # the call fails with UNAVAILABLE and this message
            return
        callback((("authorization", f"Bearer {token}"),), None)


def grpc_credentials(source: TokenSource) -> Any:
    """``grpc.CallCredentials`` adding ``authorization: Bearer <token>`` to every call.

    Call credentials need a secure channel: combine them with channel credentials, e.g.
    :func:`grpc_channel_credentials`. Raises :class:`TokenError` without grpcio.
    """
    grpc = _grpc()
    return grpc.metadata_call_credentials(_BearerPlugin(source), name="cp-token")


def grpc_channel_credentials(source: TokenSource, channel_credentials: Any = None) -> Any:
    """Channel credentials (default: TLS with the system roots) composed with
    :func:`grpc_credentials`, ready for ``grpc.secure_channel``."""
    grpc = _grpc()
    base = (
        channel_credentials if channel_credentials is not None else grpc.ssl_channel_credentials()
    )
    return grpc.composite_channel_credentials(base, grpc_credentials(source))
