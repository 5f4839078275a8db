"""The probe port every cp-token server shares: ``/healthz``, ``/readyz`` and ``/metrics``.

Probes carry no secret and sit next to the metrics, on their own port, so a NetworkPolicy
can admit Prometheus and the kubelet there and nothing else on the serving port.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

__all__ = ["Readiness", "health_routes", "probe_app"]

Readiness = Callable[[], str | None]  # None = ready, else a reason class (see below)

METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A probe port is reachable from the network: /readyz names a reason class (a word such as
# ``invalid_client``, ``signing_key``, ``starting``), never configuration, identity or an
# upstream's words. Anything else a readiness callback returns is shown as a bare "not ready".
_REASON_CLASS = re.compile(r"[a-z][a-z0-9_]{0,39}")


def health_routes(readiness: Readiness) -> list[Route]:
    """``/healthz`` (200 while the process serves) and ``/readyz`` (503 with the reason)."""

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        problem = readiness()
        if problem is None:
            return PlainTextResponse("ok")
        if not _REASON_CLASS.fullmatch(problem):
            return PlainTextResponse("not ready", status_code=503)
        return PlainTextResponse(f"not ready: {problem}", status_code=503)

    return [Route("/healthz", healthz), Route("/readyz", readyz)]


def probe_app(render_metrics: Callable[[], bytes], readiness: Readiness) -> Starlette:
    """The probe port: ``/metrics`` (Prometheus text from ``render_metrics``) and the probes."""

    async def metrics_endpoint(request: Request) -> Response:
        return Response(render_metrics(), media_type=METRICS_MEDIA_TYPE)

    return Starlette(routes=[Route("/metrics", metrics_endpoint), *health_routes(readiness)])
