"""Per-call gRPC credentials, without a server: the metadata plugin hands grpcio the current bearer
for each call (or the source's error, which fails the call), the credentials compose with
channel credentials, and without grpcio the error says what to install. (Against a real grpcio
server: tests/integration/test_grpc.py.)"""

from __future__ import annotations

import sys

import grpc
import pytest

from cp_token.client import (
    TokenError,
    TokenRejected,
    TokenSource,
    grpc_channel_credentials,
    grpc_credentials,
)
from cp_token.client._grpc import _BearerPlugin
from cp_token.runtime.clock import FakeClock
from tests.fakes.client import Script, ok, options, refused


def test_without_grpcio_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "grpc", None)
    with pytest.raises(TokenError, match="grpcio"):
        grpc_credentials(TokenSource(static_token="x"))


class Recorded:
    """grpcio's callback: what the plugin handed over."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[tuple[str, str], ...], BaseException | None]] = []

    def __call__(self, metadata: tuple[tuple[str, str], ...], error: BaseException | None) -> None:
        self.calls.append((metadata, error))


def test_each_call_gets_the_source_s_current_token() -> None:
    clock = FakeClock()
    tokens = Script(ok("t1", 100), ok("t2", 100))
    source = TokenSource(sidecar_url="http://127.0.0.1:8099/token", **options(clock, tokens))
    plugin, callback = _BearerPlugin(source), Recorded()
    plugin(None, callback)
    plugin(None, callback)  # cached: no fetch
    clock.advance(80)  # due for refresh
    plugin(None, callback)
    assert callback.calls == [
        ((("authorization", "Bearer t1"),), None),
        ((("authorization", "Bearer t1"),), None),
        ((("authorization", "Bearer t2"),), None),
    ]
    assert tokens.count == 2


def test_a_refusal_is_handed_to_grpcio_as_the_call_s_error() -> None:
    source = TokenSource(
        sidecar_url="http://127.0.0.1:8099/token",
        **options(FakeClock(), Script(refused(403, "not a session runner"))),
    )
    callback = Recorded()
    _BearerPlugin(source)(None, callback)
    ((metadata, error),) = callback.calls
    assert metadata == () and isinstance(error, TokenRejected)
    assert "not a session runner" in str(error)


def test_the_credentials_are_grpcio_s_own_types() -> None:
    source = TokenSource(static_token="x")
    assert isinstance(grpc_credentials(source), grpc.CallCredentials)
    local = grpc.local_channel_credentials()
    assert isinstance(grpc_channel_credentials(source, local), grpc.ChannelCredentials)
    assert isinstance(grpc_channel_credentials(source), grpc.ChannelCredentials)  # system TLS
