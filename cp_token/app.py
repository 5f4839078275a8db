"""The CP token service's HTTP surface: routes only.

``create_app`` receives its collaborators, so a test builds the app with fakes in one line.
The decision flow of ``GET /token`` is: bearer -> authenticate (cached TokenReview or local
verification) -> rate limit -> policy (pattern, namespace, pod binding, managed labels) ->
mint. Every refusal is an error type from :mod:`cp_token.errors`, mapped to HTTP in one place.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cp_token.authn import Authenticator
from cp_token.clock import Clock
from cp_token.errors import (
    NO_STORE,
    CPTokenError,
    MethodNotAllowed,
    Unauthenticated,
    error_response,
)
from cp_token.health import Readiness, probe_app
from cp_token.health import health_routes as _health_routes
from cp_token.identity import Identity
from cp_token.kube import labels_of
from cp_token.logs import audit
from cp_token.metrics import Metrics
from cp_token.minters import IssuedToken, Minter
from cp_token.minters.jwt import JwtMinter
from cp_token.objects import ObjectCache
from cp_token.policy import RunnerPolicy
from cp_token.ratelimit import RateLimiter

__all__ = ["create_app", "create_metrics_app", "parse_bearer", "rfc3339"]

log = logging.getLogger(__name__)

# RFC 6750 §2.1 b64token
_B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


def parse_bearer(header: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header (scheme case-insensitive)."""
    if header is None:
        raise Unauthenticated("missing Authorization: Bearer credentials", missing=True)
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthenticated("the Authorization scheme must be Bearer", missing=True)
    token = rest.strip()
    if not token:
        raise Unauthenticated("empty bearer token", reason="empty")
    if not _B64TOKEN.match(token):
        raise Unauthenticated("malformed bearer token", reason="malformed")
    return token


def rfc3339(ts: float) -> str:
    """RFC 3339 UTC with a ``Z``, whole seconds."""
    return datetime.fromtimestamp(math.floor(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def token_body(issued: IssuedToken, now: float) -> bytes:
    """The JSON of a 200 from ``/token``."""
    expires_in: int | None = None
    expires_at: str | None = None
    if issued.expires_at is not None:
        expires_in = max(0, math.floor(issued.expires_at - now))
        expires_at = rfc3339(issued.expires_at)
    body = {
        "token": issued.token,
        "token_type": "Bearer",
        "expires_at": expires_at,
        "expires_in": expires_in,
    }
    return json.dumps(body, separators=(",", ":")).encode()


class _AnyMethod:
    """An ASGI endpoint that sees every method, so `/token` answers its own 405 (HEAD too)."""

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self._handler(Request(scope, receive))
        await response(scope, receive, send)


def create_app(
    *,
    authenticator: Authenticator,
    policy: RunnerPolicy,
    minter: Minter,
    clock: Clock,
    limiter: RateLimiter,
    objects: ObjectCache | None = None,
    metrics: Metrics | None = None,
    readiness: Readiness | None = None,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
) -> Starlette:
    """The service's Starlette app (``/token``, health, and the JWKS for the jwt minter)."""
    metrics = metrics or Metrics()
    ready: Readiness = readiness or (lambda: minter.problem)

    async def decide(request: Request, seen: list[Identity]) -> IssuedToken:
        """The whole decision; appends the identity to ``seen`` once it is known."""
        if request.method != "GET":
            raise MethodNotAllowed(f"{request.method} is not allowed on /token; use GET")
        token = parse_bearer(request.headers.get("authorization"))
        identity = await authenticator.authenticate(token)
        seen.append(identity)
        limiter.check(identity.username)
        policy.check_identity(identity)
        if objects is not None and policy.needs_labels:
            ns, sa = identity.namespace, identity.service_account
            assert ns is not None and sa is not None  # check_identity ensured it
            ns_obj = await objects.namespace(ns) if policy.namespace_label else {}
            sa_obj = await objects.service_account(ns, sa) if policy.managed_label else {}
            policy.check_labels(
                identity,
                None if ns_obj is None else labels_of(ns_obj),
                None if sa_obj is None else labels_of(sa_obj),
            )
        return await minter.mint(identity)

    async def token_endpoint(request: Request) -> Response:
        start = time.perf_counter()
        seen: list[Identity] = []
        jti: str | None = None
        try:
            issued = await decide(request, seen)
            jti = issued.jti
            response: Response = Response(
                token_body(issued, clock.time()),
                media_type="application/json",
                headers=NO_STORE,
            )
            outcome, reason = "issued", "ok"
            metrics.minted.inc()
        except CPTokenError as exc:
            response = error_response(exc)
            outcome, reason = exc.error, exc.reason
        elapsed = time.perf_counter() - start
        identity = seen[0] if seen else None
        metrics.request(outcome, reason, elapsed)
        audit(
            outcome=outcome,
            reason=reason,
            username=identity.username if identity else None,
            namespace=identity.namespace if identity else None,
            pod=identity.pod_name if identity else None,
            jti=jti or (identity.credential_id if identity else None),
            latency_ms=elapsed * 1000,
        )
        return response

    routes = [Route("/token", _AnyMethod(token_endpoint)), *_health_routes(ready)]

    if isinstance(minter, JwtMinter):
        jwt_minter = minter
        cache = {"Cache-Control": f"public, max-age={jwt_minter.jwks_max_age}"}

        async def jwks(request: Request) -> Response:
            return Response(jwt_minter.jwks_body, media_type="application/json", headers=cache)

        async def discovery(request: Request) -> Response:
            body = json.dumps(jwt_minter.openid_configuration()).encode()
            return Response(body, media_type="application/json", headers=cache)

        routes += [
            Route("/.well-known/jwks.json", jwks, methods=["GET"]),
            Route("/.well-known/openid-configuration", discovery, methods=["GET"]),
        ]

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.metrics = metrics
    app.state.minter = minter
    app.state.authenticator = authenticator
    return app


def create_metrics_app(metrics: Metrics, readiness: Readiness) -> Starlette:
    """The metrics port: ``/metrics``, ``/healthz``, ``/readyz``."""
    return probe_app(metrics.render, readiness)
