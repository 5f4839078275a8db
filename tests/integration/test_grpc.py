"""Per-call gRPC credentials against a real grpcio server on loopback (no protoc)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from cp_token.client import (
    TokenSource,
    grpc_channel_credentials,
)
from cp_token.runtime.clock import FakeClock
from tests.fakes.client import Script, ok, options, refused

METHOD = "/cp.test.Echo/WhoAmI"


class EchoServer:
    """Answers with the bearer it saw and the peer address; refuses calls without one."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def who_am_i(self, request: bytes, context: Any) -> bytes:
        metadata = dict(context.invocation_metadata())
        bearer = metadata.get("authorization", "")
        if not bearer.startswith("Bearer "):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no bearer")
        self.calls.append((bearer, context.peer()))
        return bearer.encode()


@pytest.fixture
def server() -> Iterator[tuple[EchoServer, str]]:
    echo = EchoServer()
    handler = grpc.method_handlers_generic_handler(
        "cp.test.Echo",
        {
            "WhoAmI": grpc.unary_unary_rpc_method_handler(
                echo.who_am_i,
                request_deserializer=lambda b: b,
                response_serializer=lambda b: b,
            )
        },
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers((handler,))
    creds = grpc.local_server_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    port = srv.add_secure_port("127.0.0.1:0", creds)
    srv.start()
    yield echo, f"127.0.0.1:{port}"
    srv.stop(grace=None)


def local_channel(source: TokenSource, target: str) -> grpc.Channel:
    base = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    return grpc.secure_channel(target, grpc_channel_credentials(source, base))


def call(channel: grpc.Channel) -> bytes:
    stub = channel.unary_unary(
        METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    return stub(b"", timeout=5)  # type: ignore[no-any-return]


def test_every_call_carries_the_current_token_on_the_same_channel(
    server: tuple[EchoServer, str],
) -> None:
    echo, target = server
    clock = FakeClock()
    tokens = Script(ok("t1", 100), ok("t2", 100))
    source = TokenSource(sidecar_url="http://127.0.0.1:8099/token", **options(clock, tokens))
    with local_channel(source, target) as channel:
        assert call(channel) == b"Bearer t1"
        assert call(channel) == b"Bearer t1"  # cached: no new fetch
        clock.advance(80)  # the token is now due for refresh
        assert call(channel) == b"Bearer t2"
    assert tokens.count == 2
    peers = {peer for _, peer in echo.calls}
    assert len(peers) == 1  # one connection throughout: no reconnect for the new token


def test_a_refused_source_fails_the_call_without_reaching_the_server(
    server: tuple[EchoServer, str],
) -> None:
    echo, target = server
    clock = FakeClock()
    source = TokenSource(
        sidecar_url="http://127.0.0.1:8099/token",
        **options(clock, Script(refused(403, "not a session runner"))),
    )
    with local_channel(source, target) as channel, pytest.raises(grpc.RpcError) as err:
        call(channel)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "not a session runner" in err.value.details()  # type: ignore[attr-defined]
    assert echo.calls == []
