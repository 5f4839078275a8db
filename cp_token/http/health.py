"""The probe port every cp-token server shares: ``/healthz``, ``/readyz`` and ``/metrics``.

Probes carry no secret and sit next to the metrics, on their own port, so a NetworkPolicy
can admit Prometheus and the kubelet there and nothing else on the serving port.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

__all__ = ["Readiness", "health_routes", "probe_app"]

Readiness = Callable[[], str | None]  # None = ready, else the reason

METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REASON = 300


def health_routes(readiness: Readiness) -> list[Route]:
    """``/healthz`` (200 while the process serves) and ``/readyz`` (503 with the reason)."""

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        problem = readiness()
        if problem is None:
            return PlainTextResponse("ok")
        # the reason may carry an upstream's words (the IdP's): never more than 300 characters
        return PlainTextResponse(f"not ready: {problem[:MAX_REASON]}", status_code=503)

    return [Route("/healthz", healthz), Route("/readyz", readyz)]


def probe_app(render_metrics: Callable[[], bytes], readiness: Readiness) -> Starlette:
    """The probe port: ``/metrics`` (Prometheus text from ``render_metrics``) and the probes."""

    async def metrics_endpoint(request: Request) -> Response:
        return Response(render_metrics(), media_type=METRICS_MEDIA_TYPE)

    return Starlette(routes=[Route("/metrics", metrics_endpoint), *health_routes(readiness)])
