"""Sealed mode's light parts (no upstream client, no grpcio), and the wiring that loads the
rest.

- ``/token`` refused (``403 {"error": "sealed", ...}``) when the sidecar is sealed;
- :class:`ProxyMetrics`: proxied calls by protocol, upstream and status class;
- :func:`sealed_parts`: what the sidecar serves besides ``/token`` and the probes. The HTTP
  egress (:mod:`sidecar.egress` and its pool) is imported only when ``SIDECAR_UPSTREAMS`` is set
  and the gRPC listener (:mod:`sidecar.grpc_proxy`, grpcio: ~17 MiB) only when
  ``SIDECAR_GRPC_UPSTREAM`` is: a plain sidecar loads neither (memory, one per pod).
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cp_token.runtime.metrics import Counter, CounterSeries
from cp_token.settings.sidecar import UPSTREAM_PREFIX, SidecarSettings

from .asgi import ASGIApp, Lifespan, Receive, Scope, Send
from .bearer import HeldBearer
from .metrics import SidecarMetrics

if TYPE_CHECKING:
    from .refresher import Refresher

__all__ = [
    "GRPC_CLASSES",
    "STATUS_CLASSES",
    "ProxyMetrics",
    "SealedParts",
    "sealed_parts",
    "sealed_token_endpoint",
    "send_json",
    "status_class",
]

log = logging.getLogger("sidecar.sealed")

STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
# gRPC status codes by the HTTP status class they map to (the mapping grpc-gateway and the
# gRPC HTTP/JSON transcoding use), so a dashboard reads both protocols alike.
GRPC_CLASSES = {
    "OK": "2xx",
    "CANCELLED": "4xx",
    "UNKNOWN": "5xx",
    "INVALID_ARGUMENT": "4xx",
    "DEADLINE_EXCEEDED": "5xx",
    "NOT_FOUND": "4xx",
    "ALREADY_EXISTS": "4xx",
    "PERMISSION_DENIED": "4xx",
    "RESOURCE_EXHAUSTED": "4xx",
    "FAILED_PRECONDITION": "4xx",
    "ABORTED": "4xx",
    "OUT_OF_RANGE": "4xx",
    "UNIMPLEMENTED": "5xx",
    "INTERNAL": "5xx",
    "UNAVAILABLE": "5xx",
    "DATA_LOSS": "5xx",
    "UNAUTHENTICATED": "4xx",
}
_JSON_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
SEALED_DESCRIPTION = (
    "this sidecar is sealed: the token never leaves it; send API calls through "
    f"{UPSTREAM_PREFIX}<name>/ (or its gRPC listener), which add it"
)


async def send_json(
    send: Send,
    status: int,
    error: str,
    description: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Answer ``{"error": error, "error_description": description}`` (never cached)."""
    body = json.dumps({"error": error, "error_description": description}).encode()
    head = [*_JSON_HEADERS, *headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def sealed_token_endpoint(metrics: SidecarMetrics) -> ASGIApp:
    """``/token`` of a sealed sidecar: ``GET``/``POST`` 403 ``sealed``, other methods 405."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        if method not in ("GET", "POST"):
            metrics.request(method, "not_allowed")
            await send_json(
                send,
                405,
                "method_not_allowed",
                "use GET (or POST to force a fresh token)",
                [(b"allow", b"GET, POST")],
            )
            return
        metrics.request(method, "refused")
        await send_json(send, 403, "sealed", SEALED_DESCRIPTION)

    return endpoint


def status_class(status: int) -> str:
    """``2xx`` .. ``5xx`` (an informational status counts as ``2xx``, anything past 5xx as
    ``5xx``): the only values the class label takes."""
    return STATUS_CLASSES[min(max(status // 100, 2), 5) - 2]


class ProxyMetrics:
    """``cp_token_sidecar_proxied_requests_total{protocol, upstream, class}``: fixed label
    values only (the configured upstream names, the gRPC target, four classes), never a
    path, query, method or identity."""

    NAME = "cp_token_sidecar_proxied_requests_total"  # as exposed

    def __init__(self, http_names: Sequence[str], grpc_target: str | None) -> None:
        keys = [("http", name, cls) for name in http_names for cls in STATUS_CLASSES]
        if grpc_target is not None:
            keys += [("grpc", grpc_target, cls) for cls in STATUS_CLASSES]
        self.family = Counter(
            self.NAME,
            "Calls proxied to the upstreams (sealed mode) by protocol, upstream and status class.",
            ("protocol", "upstream", "class"),
            series=keys,
        )
        # only these series are counted (a name not configured is never a label value)
        self.counters: dict[tuple[str, ...], CounterSeries] = {
            key: self.family.labels(*key) for key in keys
        }
        self._grpc_target = grpc_target

    def http(self, upstream: str, status: int) -> None:
        """Count one HTTP call to ``upstream`` answered ``status``."""
        counter = self.counters.get(("http", upstream, status_class(status)))
        if counter is not None:
            counter.inc()

    def grpc(self, code: str) -> None:
        """Count one gRPC call ended with status ``code`` (``grpc.StatusCode`` name)."""
        if self._grpc_target is not None:
            cls = GRPC_CLASSES.get(code, "5xx")
            self.counters[("grpc", self._grpc_target, cls)].inc()


@dataclass
class SealedParts:
    """What the sidecar serves besides ``/token`` and the probes, and runs meanwhile."""

    token_route: ASGIApp | None = None  # replaces /token (sealed)
    prefixes: dict[str, ASGIApp] = field(default_factory=dict)
    contexts: list[Lifespan] = field(default_factory=list)


async def sealed_parts(
    settings: SidecarSettings, refresher: Refresher, metrics: SidecarMetrics
) -> SealedParts:
    """The parts ``settings`` ask for (none for a plain sidecar). Binds the gRPC listener
    now (``OSError`` when it cannot: a busy port); it serves from the app's lifespan."""
    parts = SealedParts()
    if settings.sealed:
        parts.token_route = sealed_token_endpoint(metrics)
    if not settings.upstreams and settings.grpc_upstream is None:
        return parts
    proxy_metrics = ProxyMetrics([name for name, _ in settings.upstreams], settings.grpc_upstream)
    metrics.add(proxy_metrics.family)
    bearer = HeldBearer(refresher, settings.min_ttl)
    if settings.upstreams:
        from .egress import EgressApp, Upstream
        from .egress_pool import UpstreamPool

        egress = EgressApp(
            [Upstream.from_url(name, base) for name, base in settings.upstreams],
            bearer,
            proxy_metrics,
            UpstreamPool(ssl.create_default_context(cafile=settings.upstream_ca_file)),
            timeout=settings.upstream_timeout,
            prefix=UPSTREAM_PREFIX,
        )
        parts.prefixes[UPSTREAM_PREFIX] = egress

        @contextlib.asynccontextmanager
        async def egress_pool() -> AsyncIterator[None]:
            try:
                yield
            finally:
                await egress.aclose()

        parts.contexts.append(egress_pool)
    if settings.grpc_upstream is not None:
        from .grpc_proxy import GrpcProxy

        proxy = GrpcProxy(
            settings.grpc_upstream,
            bearer,
            proxy_metrics,
            ca_file=settings.upstream_ca_file,
        )
        proxy.bind(settings.grpc_listen_host, settings.grpc_listen_port)
        parts.contexts.append(proxy.serving)
    return parts
