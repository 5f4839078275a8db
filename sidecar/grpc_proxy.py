"""The sealed sidecar's gRPC listener: every method forwarded to the gRPC API with the token.

A plaintext HTTP/2 (h2c) ``grpc.aio`` server on loopback (``SIDECAR_GRPC_LISTEN_ADDR``)
with one generic handler: whatever the method (unary or streaming, either way), its messages
are relayed as opaque bytes to ``SIDECAR_GRPC_UPSTREAM`` over TLS
(``SIDECAR_UPSTREAM_CA_FILE`` or the system roots), with ``authorization: Bearer <held
token>`` in place of any ``authorization`` the caller sent. The caller's deadline becomes the
upstream call's; a caller that cancels cancels the upstream call; the upstream's headers,
messages, trailers, status code and details come back as they are. An ``UNAUTHENTICATED``
from the upstream forces a fresh token (shared with every other caller) for the next call;
the call itself is not repeated (its request stream is gone).

grpcio is a maintained gRPC implementation (HTTP/2 framing, flow control, TLS); it is only
imported by a sidecar with ``SIDECAR_GRPC_UPSTREAM`` set (about 17 MiB of resident memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from .bearer import HeldBearer, NoToken
from .sealed import ProxyMetrics

__all__ = ["GrpcProxy", "incoming_metadata", "outgoing_metadata"]

log = logging.getLogger("sidecar.grpc")

# Messages are relayed whole, one at a time; the upstream enforces its own limits.
OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
MAX_CONCURRENT_RPCS = 1024
GRACE_SECONDS = 5.0
# the CP's refusal of this pod, as a gRPC status (grpc-gateway's HTTP mapping, reversed)
REJECTED_CODES = {401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED}
# Metadata that belongs to the transport, not to the call: grpcio sets it itself.
_RESERVED = frozenset({"authorization", "user-agent", "te", "content-type", "host"})

Metadata = Iterable[tuple[str, str | bytes]]


def outgoing_metadata(caller: Metadata | None, token: str) -> list[tuple[str, str | bytes]]:
    """The caller's metadata as the upstream gets it: no ``authorization`` (the held token's
    is added), nothing reserved to the transport (``:``-pseudo headers, ``grpc-*``)."""
    kept = [
        (key, value)
        for key, value in caller or ()
        if key.lower() not in _RESERVED and not key.startswith((":", "grpc-"))
    ]
    kept.append(("authorization", f"Bearer {token}"))
    return kept


def incoming_metadata(upstream: Metadata | None, token: str) -> tuple[tuple[str, str | bytes], ...]:
    """The upstream's headers or trailers as the caller gets them: none reserved to the
    transport (but ``grpc-status-details-bin``, the rich status), none holding the token."""
    secret = token.encode()
    kept: list[tuple[str, str | bytes]] = []
    for key, value in upstream or ():
        low = key.lower()
        if low.startswith(":") or (low.startswith("grpc-") and low != "grpc-status-details-bin"):
            continue
        if low in ("content-type", "te"):
            continue
        raw = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
        if secret in raw:
            continue
        kept.append((key, value))
    return tuple(kept)  # grpcio takes a tuple, not a list


class _Forwarder(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Answers every method with one bytes-in, bytes-out stream handler."""

    def __init__(self, proxy: GrpcProxy) -> None:
        self._proxy = proxy

    def service(self, handler_call_details: Any) -> Any:
        method: str = handler_call_details.method
        proxy = self._proxy

        async def forward(requests: AsyncIterator[bytes], context: Any) -> None:
            await proxy.forward(method, requests, context)

        # no (de)serializers: the messages stay opaque bytes
        return grpc.stream_stream_rpc_method_handler(forward)


class GrpcProxy:
    """The listener (:meth:`bind`, then :meth:`serving` for the app's lifespan) and the
    forwarding of each call (:meth:`forward`)."""

    def __init__(
        self,
        target: str,
        bearer: HeldBearer,
        metrics: ProxyMetrics,
        *,
        ca_file: str | None = None,
    ) -> None:
        self._target = target
        self._bearer = bearer
        self._metrics = metrics
        self._ca_file = ca_file
        self._server: Any = None
        self._channel: Any = None
        self._address = ""

    def bind(self, host: str, port: int) -> int:
        """Create the server and bind its plaintext port (needs the running loop); returns
        the port. Raises OSError when the address cannot be bound."""
        server = grpc.aio.server(
            handlers=[_Forwarder(self)],
            options=OPTIONS,
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound: int = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio's way of saying the port is taken
            raise OSError(str(exc)) from None
        if not bound:
            raise OSError("the address cannot be bound")
        self._server = server
        self._address = f"{address.rsplit(':', 1)[0]}:{bound}"
        return bound

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Serve while the context is open: open the TLS channel, start, then stop both."""
        if self._server is None:
            raise RuntimeError("bind() first")
        root = None
        if self._ca_file is not None:  # read once, at start (checked by the settings)
            root = await asyncio.to_thread(Path(self._ca_file).read_bytes)
        credentials = grpc.ssl_channel_credentials(root_certificates=root)
        self._channel = grpc.aio.secure_channel(self._target, credentials, options=OPTIONS)
        await self._server.start()
        fields = {"listener": f"h2c://{self._address}", "upstream": self._target}
        log.info("serving gRPC", extra={"fields": fields})
        try:
            yield
        finally:
            await self._server.stop(GRACE_SECONDS)
            await self._channel.close()

    async def forward(self, method: str, requests: AsyncIterator[bytes], context: Any) -> None:
        """Relay one call to the upstream and its outcome back (see the module docstring)."""
        try:
            token = await self._bearer.current()
        except NoToken as exc:
            # the CP refused this pod: as final as GET /token's relayed 401/403
            code = grpc.StatusCode.UNAVAILABLE
            if exc.rejected is not None:
                code = REJECTED_CODES.get(exc.rejected, grpc.StatusCode.PERMISSION_DENIED)
            self._metrics.grpc(code.name)
            await context.abort(code, exc.reason)
            return
        try:
            status, details, trailers = await self._relay(method, requests, context, token)
        except asyncio.CancelledError:  # the caller cancelled, or its deadline passed
            self._metrics.grpc("CANCELLED")
            raise
        self._metrics.grpc(status.name)
        if status == grpc.StatusCode.UNAUTHENTICATED:
            await self._bearer.after_rejection(token)  # the next call carries a fresh one
        if status != grpc.StatusCode.OK:
            await context.abort(status, details or "", trailers)
        context.set_trailing_metadata(trailers)

    async def _relay(
        self, method: str, requests: AsyncIterator[bytes], context: Any, token: str
    ) -> tuple[Any, str | None, tuple[tuple[str, str | bytes], ...]]:
        """Run the upstream call, writing its headers and messages to the caller; returns
        its status code, details and trailers."""
        metadata = outgoing_metadata(context.invocation_metadata(), token)
        call = self._channel.stream_stream(method)(
            requests, metadata=metadata, timeout=context.time_remaining()
        )
        try:
            headers = await call.initial_metadata()
            passed = incoming_metadata(headers, token)
            if passed:
                await context.send_initial_metadata(passed)
            with contextlib.suppress(grpc.aio.AioRpcError):  # the status is read below
                async for message in call:
                    await context.write(message)
            status = await call.code()
            details = await call.details()
            trailers = incoming_metadata(await call.trailing_metadata(), token)
        except BaseException:
            call.cancel()
            raise
        return status, details, trailers
