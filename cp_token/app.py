"""The CP token service's HTTP surface: two doors in front of one decision, and metadata.

``create_app`` receives its collaborators, so a test builds the app with fakes in one line.
``GET /token`` (bearer) and ``POST /oauth2/token`` (RFC 8693 token exchange) are thin parsers
in front of the same :class:`~cp_token.decision.TokenDecision` (authenticate -> rate limit ->
policy -> mint); each maps refusals to its protocol with one function of
:mod:`cp_token.errors`. Whatever happens inside, the answer is never a 500: an unexpected
exception is logged once by type, audited as ``internal`` and answered 503.
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cp_token.authn import Authenticator
from cp_token.bodies import read_body
from cp_token.clock import Clock, rfc3339
from cp_token.credential import parse_bearer
from cp_token.decision import TokenAsk, TokenDecision, Trace
from cp_token.errors import (
    NO_STORE,
    NO_STORE_EXCHANGE,
    CPTokenError,
    InternalError,
    MethodNotAllowed,
    error_response,
    exchange_error_response,
)
from cp_token.exchange import (
    MAX_BODY_BYTES,
    ExchangeRules,
    authorization_server_metadata,
    check_content_type,
    parse_exchange,
    parse_form,
)
from cp_token.health import Readiness, probe_app
from cp_token.health import health_routes as _health_routes
from cp_token.logs import audit
from cp_token.metrics import Metrics
from cp_token.minters import IssuedToken, Minter
from cp_token.minters.jwt import JwtMinter
from cp_token.objects import ObjectCache
from cp_token.policy import RunnerPolicy
from cp_token.ratelimit import RateLimiter

__all__ = [
    "ExchangeConfig",
    "create_app",
    "create_metrics_app",
    "exchange_body",
    "parse_bearer",
    "rfc3339",
    "token_body",
]

log = logging.getLogger(__name__)

EVENT_TOKEN = "token_request"
EVENT_EXCHANGE = "token_exchange"
_JSON = "application/json"


@dataclass(frozen=True)
class ExchangeConfig:
    """The token exchange's settings (``CP_TOKEN_EXCHANGE_*``) and its RFC 8414 metadata.

    ``audiences`` None: the ``jwt`` minter's own audience (none for other minters).
    ``issuer``: for minters other than ``jwt`` (whose own issuer wins); with neither, no
    metadata is served (404).
    ``token_endpoint`` None: ``<issuer>/oauth2/token``.
    """

    audiences: tuple[str, ...] | None = None
    scopes: tuple[str, ...] = ()
    issuer: str | None = None
    token_endpoint: str | None = None


def _expires_in(issued: IssuedToken, now: float) -> int | None:
    if issued.expires_at is None:
        return None
    return max(0, math.floor(issued.expires_at - now))


def token_body(issued: IssuedToken, now: float) -> bytes:
    """The JSON of a 200 from ``GET /token``."""
    body = {
        "token": issued.token,
        "token_type": "Bearer",
        "expires_at": None if issued.expires_at is None else rfc3339(issued.expires_at),
        "expires_in": _expires_in(issued, now),
    }
    return json.dumps(body, separators=(",", ":")).encode()


def exchange_body(issued: IssuedToken, ask: TokenAsk, now: float) -> bytes:
    """The JSON of a 200 from ``POST /oauth2/token`` (RFC 8693 §2.2.1)."""
    body: dict[str, Any] = {
        "access_token": issued.token,
        "issued_token_type": ask.token_type,
        "token_type": "Bearer",
    }
    expires_in = _expires_in(issued, now)
    if expires_in is not None:
        body["expires_in"] = expires_in
    if ask.options.scopes:
        body["scope"] = " ".join(ask.options.scopes)
    return json.dumps(body, separators=(",", ":")).encode()


class _AnyMethod:
    """An ASGI endpoint that sees every method, so a door answers its own 405 (HEAD too)."""

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self._handler(Request(scope, receive))
        await response(scope, receive, send)


@dataclass(frozen=True)
class _Door:
    """One protocol in front of the decision: parse, render a success, map a refusal."""

    event: str
    parse: Callable[[Request], Awaitable[TokenAsk]]
    render: Callable[[IssuedToken, TokenAsk, float], bytes]
    refuse: Callable[[CPTokenError], Response]
    headers: Mapping[str, str]


async def _parse_get(request: Request) -> TokenAsk:
    """``GET /token``: the bearer token (its length checked before anything else)."""
    if request.method != "GET":
        raise MethodNotAllowed(f"{request.method} is not allowed on /token; use GET")
    return TokenAsk(credential=parse_bearer(request.headers.get("authorization")))


def _exchange_parser(rules: ExchangeRules) -> Callable[[Request], Awaitable[TokenAsk]]:
    async def parse(request: Request) -> TokenAsk:
        """``POST /oauth2/token``: a form; ``Authorization`` and unknown fields are ignored."""
        if request.method != "POST":
            raise MethodNotAllowed(
                f"{request.method} is not allowed on /oauth2/token; use POST", allow="POST"
            )
        check_content_type(request.headers.get("content-type"))
        form = parse_form(await read_body(request, MAX_BODY_BYTES))
        return parse_exchange(form, rules)

    return parse


def _unexpected(exc: Exception, event: str) -> InternalError:
    """Log a bug once: its type and innermost place, never its message (it may hold input)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{PurePath(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    log.error(
        "unexpected %s in the token decision (%s) at %s; answered 503",
        type(exc).__name__,
        event,
        where,
        extra={"fields": {"exc_type": type(exc).__name__, "where": where, "event": event}},
    )
    return InternalError()


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
    exchange: ExchangeConfig | None = None,
) -> Starlette:
    """The service's app: ``/token``, ``/oauth2/token``, health, metadata, JWKS (jwt minter)."""
    metrics = metrics or Metrics()
    ready: Readiness = readiness or (lambda: minter.problem)
    exchange = exchange or ExchangeConfig()
    jwt_minter = minter if isinstance(minter, JwtMinter) else None
    decision = TokenDecision(
        authenticator=authenticator, policy=policy, minter=minter, limiter=limiter, objects=objects
    )
    default_audiences = (jwt_minter.audience,) if jwt_minter else ()
    rules = ExchangeRules(
        audiences=default_audiences if exchange.audiences is None else exchange.audiences,
        scopes=exchange.scopes,
        per_request=jwt_minter is not None,
    )

    async def answer(request: Request, door: _Door) -> Response:
        """Run one request through its door and the decision; audit it, whatever happens."""
        start = time.perf_counter()
        client = request.client
        trace = Trace(peer=client.host if client else None)
        try:
            ask = await door.parse(request)
            issued = await decision.decide(ask, trace)
            body = door.render(issued, ask, clock.time())
            response = Response(body, media_type=_JSON, headers=dict(door.headers))
            outcome, reason = "issued", "ok"
            metrics.minted.inc()
        except CPTokenError as refusal:
            response = door.refuse(refusal)
            outcome, reason = refusal.outcome, refusal.reason
        except Exception as exc:  # a bug anywhere in the pipeline: 503, never a 500
            internal = _unexpected(exc, door.event)
            response = door.refuse(internal)
            outcome, reason = internal.outcome, internal.reason
        elapsed = time.perf_counter() - start
        identity = trace.identity
        metrics.request(outcome, reason, elapsed)
        audit(
            event=door.event,
            outcome=outcome,
            reason=reason,
            username=identity.username if identity else None,
            namespace=identity.namespace if identity else None,
            pod=identity.pod_name if identity else None,
            jti=(trace.issued.jti if trace.issued else None)
            or (identity.credential_id if identity else None),
            latency_ms=elapsed * 1000,
        )
        return response

    get_door = _Door(
        event=EVENT_TOKEN,
        parse=_parse_get,
        render=lambda issued, _ask, now: token_body(issued, now),
        refuse=error_response,
        headers=NO_STORE,
    )
    exchange_door = _Door(
        event=EVENT_EXCHANGE,
        parse=_exchange_parser(rules),
        render=exchange_body,
        refuse=exchange_error_response,
        headers=NO_STORE_EXCHANGE,
    )

    async def token_endpoint(request: Request) -> Response:
        return await answer(request, get_door)

    async def exchange_endpoint(request: Request) -> Response:
        return await answer(request, exchange_door)

    routes = [
        Route("/token", _AnyMethod(token_endpoint)),
        Route("/oauth2/token", _AnyMethod(exchange_endpoint)),
        *_health_routes(ready),
    ]

    # the jwt minter's own issuer first, so the metadata's `issuer` is its tokens' `iss`
    issuer = (jwt_minter.issuer if jwt_minter else None) or exchange.issuer
    if issuer is not None:
        metadata = authorization_server_metadata(
            issuer=issuer,
            token_endpoint=exchange.token_endpoint or f"{issuer.rstrip('/')}/oauth2/token",
            jwks_uri=f"{jwt_minter.issuer}/.well-known/jwks.json" if jwt_minter else None,
            scopes=rules.scopes if rules.per_request else (),
        )
        metadata_body = json.dumps(metadata, separators=(",", ":")).encode()
        metadata_cache = {"Cache-Control": "public, max-age=300"}

        async def oauth_metadata(request: Request) -> Response:
            return Response(metadata_body, media_type=_JSON, headers=metadata_cache)

        routes.append(
            Route("/.well-known/oauth-authorization-server", oauth_metadata, methods=["GET"])
        )

    if jwt_minter is not None:
        publisher = jwt_minter
        cache = {"Cache-Control": f"public, max-age={publisher.jwks_max_age}"}

        async def jwks(request: Request) -> Response:
            return Response(publisher.jwks_body, media_type=_JSON, headers=cache)

        async def discovery(request: Request) -> Response:
            body = json.dumps(publisher.openid_configuration()).encode()
            return Response(body, media_type=_JSON, headers=cache)

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
