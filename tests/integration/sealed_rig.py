"""The upstreams a sealed sidecar calls, as real TLS servers on loopback, recording what they see.

- :class:`RecordingUpstream`: an HTTPS API (uvicorn + Starlette in a thread, its own trustme
  CA) that records every request's headers and body digest, answers 401 to revoked tokens,
  and serves server-sent events, a streamed upload sink, a redirect and a hanging route.
- :class:`GrpcUpstream`: a TLS gRPC API written with grpcio's generic handlers (bytes in and
  out, no protoc): unary, server-streaming, bidirectional, slow and failing methods, each
  recording the ``authorization`` metadata it received.
- :func:`sealed_sidecar`: ``cp-token-sidecar`` in sealed mode towards both.

Shared by tests/integration/test_sealed.py and bench/bench_sealed.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import trustme
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.servers import LoopbackServer
from tests.integration.procs import Proc, free_port

__all__ = [
    "GRPC_SERVICE",
    "GrpcUpstream",
    "RecordingUpstream",
    "Seen",
    "sealed_sidecar",
    "write_ca_bundle",
]

GRPC_SERVICE = "cp.test.Echo"
HEADER = {"Ambient-Token-Request": "true"}


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    size: int = 0
    sha256: str = ""
    at: float = field(default_factory=time.monotonic)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


class RecordingUpstream:
    """An HTTPS API under ``/v1`` recording every request (see the module docstring)."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.revoked: set[str] = set()
        # answers to revoked tokens wait until this many have arrived (concurrent 401s)
        self.hold_revoked = 0
        self._revoked_seen = 0
        self.sse_sent: list[float] = []
        self.sse_events = 5
        self.sse_interval = 0.2
        self._lock = threading.Lock()
        routes = [
            Route("/v1/sse", self._sse, methods=["GET"]),
            Route("/v1/upload", self._upload, methods=["PUT", "POST"]),
            Route("/v1/moved", self._moved, methods=["GET"]),
            Route("/v1/hang", self._hang, methods=["GET"]),
            Route("/v1/{rest:path}", self._echo, methods=["GET", "HEAD", "POST", "PUT", "DELETE"]),
        ]
        self.server = LoopbackServer(Starlette(routes=routes), tls=True, name="api-upstream")

    @property
    def url(self) -> str:
        return self.server.url

    def _record(self, request: Request, size: int = 0, digest: str = "") -> Seen:
        seen = Seen(
            request.method,
            request.url.path,
            request.url.query,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
            size,
            digest,
        )
        with self._lock:
            self.seen.append(seen)
        return seen

    def hold_revoked_answers(self, count: int) -> None:
        """From now on, answers to revoked tokens wait until ``count`` of them arrived."""
        with self._lock:
            self.hold_revoked, self._revoked_seen = count, 0

    async def refused(self, seen: Seen) -> Response | None:
        tokens = [a.removeprefix("Bearer ") for a in seen.all("authorization")]
        if len(tokens) == 1 and tokens[0] in self.revoked:
            with self._lock:
                self._revoked_seen += 1
            self.server.notify()
            await self.server.wait_until(lambda: self._revoked_seen >= self.hold_revoked, 10)
        if len(tokens) != 1 or tokens[0] in self.revoked:
            return JSONResponse({"error": "invalid_token"}, status_code=401)
        return None

    async def _echo(self, request: Request) -> Response:
        body = await request.body()
        seen = self._record(request, len(body), hashlib.sha256(body).hexdigest())
        refused = await self.refused(seen)
        if refused is not None:
            return refused
        # what the caller may see of its request: never the authorization header
        shown = [(k, v) for k, v in seen.headers if k != "authorization"]
        return JSONResponse(
            {"method": seen.method, "path": seen.path, "query": seen.query, "headers": shown},
            headers={"X-Upstream": "api"},
        )

    async def _sse(self, request: Request) -> Response:
        seen = self._record(request)
        refused = await self.refused(seen)
        if refused is not None:
            return refused
        self.sse_sent = []

        async def events() -> AsyncIterator[bytes]:
            for i in range(self.sse_events):
                if i:
                    await asyncio.sleep(self.sse_interval)
                self.sse_sent.append(time.monotonic())
                yield f"id: {i}\ndata: event {i}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _upload(self, request: Request) -> Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.stream():  # never held whole
            digest.update(chunk)
            size += len(chunk)
        seen = self._record(request, size, digest.hexdigest())
        refused = await self.refused(seen)
        if refused is not None:
            return refused
        return JSONResponse({"size": size, "sha256": seen.sha256})

    async def _moved(self, request: Request) -> Response:
        self._record(request)
        return Response(status_code=302, headers={"Location": "https://login.example/next"})

    async def _hang(self, request: Request) -> Response:
        self._record(request)
        await self.server.wait_until(lambda: False, timeout=30)
        return Response(b"late")

    def __enter__(self) -> RecordingUpstream:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.close()


def _method(handler: Any, kind: str) -> Any:
    make = {
        "unary": grpc.unary_unary_rpc_method_handler,
        "server_stream": grpc.unary_stream_rpc_method_handler,
        "bidi": grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(handler)  # no (de)serializers: bytes in, bytes out


class GrpcUpstream:
    """A TLS gRPC API (``cp.test.Echo``) recording the bearer of every call."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        self.bearers: list[list[str]] = []
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        handler = grpc.method_handlers_generic_handler(
            GRPC_SERVICE,
            {
                "Unary": _method(self._unary, "unary"),
                "Stream": _method(self._stream, "server_stream"),
                "Bidi": _method(self._bidi, "bidi"),
                "Slow": _method(self._slow, "unary"),
                "Fail": _method(self._fail, "unary"),
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((handler,))
        credentials = grpc.ssl_server_credentials(
            [(leaf.private_key_pem.bytes(), leaf.cert_chain_pems[0].bytes())]
        )
        self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.target = f"127.0.0.1:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()

    def _bearer(self, context: Any) -> None:
        auth = [v for k, v in context.invocation_metadata() if k == "authorization"]
        with self._lock:
            self.bearers.append(auth)
        if len(auth) != 1 or not auth[0].startswith("Bearer "):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "exactly one bearer expected")

    def _unary(self, request: bytes, context: Any) -> bytes:
        self._bearer(context)
        context.send_initial_metadata((("x-initial", "hello"),))
        context.set_trailing_metadata((("x-trailer", "bye"), ("x-bin-bin", b"\x00\x01")))
        others = sorted(k for k, _ in context.invocation_metadata())
        return json.dumps({"echo": request.decode(), "keys": others}).encode()

    def _stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        self._bearer(context)
        count = int(request or b"3")
        for i in range(count):
            if not context.is_active():
                self.cancelled.set()
                return
            yield f"message {i}".encode()
            time.sleep(0.05)
        if not context.is_active():
            self.cancelled.set()

    def _bidi(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        self._bearer(context)
        for request in requests:
            yield b"re: " + request

    def _slow(self, request: bytes, context: Any) -> bytes:
        self._bearer(context)
        deadline = time.monotonic() + 10
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not context.is_active():
            self.cancelled.set()
        return b"too late"

    def _fail(self, request: bytes, context: Any) -> bytes:
        self._bearer(context)
        context.abort_with_status(_FailStatus())
        return b""

    def __enter__(self) -> GrpcUpstream:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(grace=None)


class _FailStatus(grpc.Status):  # type: ignore[misc]
    """A status with details and a rich-status trailer, as grpcio-status would build it."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    details = "the session is archived"
    trailing_metadata = (("grpc-status-details-bin", b"\x08\x09rich"), ("x-reason", "archived"))


def write_ca_bundle(path: Path, *pems: bytes) -> Path:
    path.write_bytes(b"".join(pems))
    return path


def sealed_sidecar(
    cp_url: str, sa_file: Path, log: Path, *, grpc_port: int | None = None, **env: str
) -> tuple[Proc, str, int]:
    """``cp-token-sidecar`` in sealed mode on free loopback ports (``env`` adds the upstream
    variables); returns (proc, base URL, gRPC listener port)."""
    port = free_port()
    gport = grpc_port or free_port()
    full = {
        "AMBIENT_CP_TOKEN_URL": cp_url,
        "AMBIENT_SA_TOKEN_FILE": str(sa_file),
        "SIDECAR_LISTEN_ADDR": f"127.0.0.1:{port}",
        "SIDECAR_GRPC_LISTEN_ADDR": f"127.0.0.1:{gport}",
        "SIDECAR_SEALED": "true",
        "SIDECAR_MIN_TTL": "1",
        **env,
    }
    proc = Proc([sys.executable, "-m", "sidecar"], full, log)
    return proc, f"http://127.0.0.1:{port}", gport
