"""The sealed sidecar's gRPC forwarding, without a network: the metadata rules both ways (the
caller's ``authorization`` replaced by the held token's, nothing of the transport passed on,
nothing holding the token handed back), a call with no token held refused UNAVAILABLE, and
a pod the CP refuses gets UNAUTHENTICATED or PERMISSION_DENIED
before any upstream call. (A real grpcio client, the proxy and a TLS upstream:
tests/integration/test_sealed.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar.bearer import HeldBearer
from sidecar.grpc_proxy import GrpcProxy, incoming_metadata, outgoing_metadata
from sidecar.sealed import ProxyMetrics
from tests.fakes.client import Script, refused, unavailable
from tests.fakes.sidecar_rig import Rig

TOKEN = "held-token-abc"


def test_the_upstream_gets_the_held_token_and_the_caller_s_own_metadata() -> None:
    caller = [
        ("authorization", "Bearer the-caller-s-own"),
        ("Authorization", "Basic dXNlcjpwdw=="),
        ("x-request-id", "r-1"),
        ("x-trace-bin", b"\x00\x01"),
        ("user-agent", "grpc-python"),
        (":authority", "127.0.0.1:8098"),
        ("grpc-timeout", "5S"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
    ]
    assert outgoing_metadata(caller, TOKEN) == [
        ("x-request-id", "r-1"),
        ("x-trace-bin", b"\x00\x01"),
        ("authorization", f"Bearer {TOKEN}"),
    ]
    assert outgoing_metadata(None, TOKEN) == [("authorization", f"Bearer {TOKEN}")]


def test_the_caller_never_gets_the_token_back_nor_the_transport_s_headers() -> None:
    upstream = [
        ("x-echo", f"Bearer {TOKEN}"),
        ("x-echo-bin", TOKEN.encode()),
        ("x-ok", "fine"),
        ("grpc-status", "0"),
        ("grpc-message", "ok"),
        ("grpc-status-details-bin", b"\x08\x05"),
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    assert incoming_metadata(upstream, TOKEN) == (
        ("x-ok", "fine"),
        ("grpc-status-details-bin", b"\x08\x05"),  # the rich status is passed on
    )
    assert incoming_metadata(None, TOKEN) == ()


class Context:
    """The part of ``grpc.aio.ServicerContext`` the proxy uses before it calls upstream."""

    def __init__(self) -> None:
        self.aborted: tuple[Any, str] | None = None

    async def abort(self, code: Any, details: str, trailers: Any = ()) -> None:
        self.aborted = (code, details)
        raise grpc.RpcError()  # grpcio's abort never returns


@pytest.mark.parametrize(
    "answer, code, details",
    [
        (
            refused(403, "not a session runner"),
            grpc.StatusCode.PERMISSION_DENIED,
            "no unexpired token held: the CP refused this pod (403)",
        ),
        (
            refused(401, "token expired"),
            grpc.StatusCode.UNAUTHENTICATED,
            "no unexpired token held: the CP refused this pod (401)",
        ),
    ],
)
async def test_a_pod_the_cp_refuses_gets_the_refusal_and_reaches_no_upstream(
    tmp_path: Path, answer: Any, code: grpc.StatusCode, details: str
) -> None:
    """As final as GET /token's relayed 401/403: a client does not retry it."""
    rig = Rig(Script(answer), tmp_path)
    metrics = ProxyMetrics([], "api.example:443")
    proxy = GrpcProxy("api.example:443", HeldBearer(rig.refresher, 60), metrics)
    context = Context()

    async def no_requests() -> Any:
        raise AssertionError("the request stream is not read")
        yield b""  # pragma: no cover

    with pytest.raises(grpc.RpcError):
        await proxy.forward("/pkg.Service/Method", no_requests(), context)
    assert context.aborted == (code, details)
    assert metrics.counters[("grpc", "api.example:443", "4xx")].value == 1


async def test_with_no_token_held_a_call_is_unavailable_and_reaches_no_upstream(
    tmp_path: Path,
) -> None:
    rig = Rig(Script(unavailable(503, "3")), tmp_path)
    metrics = ProxyMetrics([], "api.example:443")
    proxy = GrpcProxy("api.example:443", HeldBearer(rig.refresher, 60), metrics)
    context = Context()

    async def no_requests() -> Any:
        raise AssertionError("the request stream is not read")
        yield b""  # pragma: no cover

    with pytest.raises(grpc.RpcError):
        await proxy.forward("/pkg.Service/Method", no_requests(), context)
    assert context.aborted is not None
    code, details = context.aborted
    assert code is grpc.StatusCode.UNAVAILABLE
    assert details.startswith("no unexpired token held: ")
    assert metrics.counters[("grpc", "api.example:443", "5xx")].value == 1


async def test_serving_needs_a_bound_port_first(tmp_path: Path) -> None:
    rig = Rig(Script(refused(403, "no")), tmp_path)
    proxy = GrpcProxy("api.example:443", HeldBearer(rig.refresher, 60), ProxyMetrics([], None))
    with pytest.raises(RuntimeError, match="bind"):
        async with proxy.serving():
            pass
