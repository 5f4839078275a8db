"""The CP token service's HTTP surface: two doors in front of one decision, and metadata.

``create_app`` receives its collaborators, so a test builds the app with fakes in one line.
``GET /token`` (bearer) and ``POST /oauth2/token`` (RFC 8693 token exchange) are thin parsers
in front of the same :class:`~cp_token.decision.TokenDecision` (authenticate -> rate limit ->
policy -> mint); each maps refusals to its protocol with one function of
:mod:`cp_token.errors`. Whatever happens inside, the answer is never a 500: an unexpected
exception is logged once by type, audited as ``internal`` and answered 503.

The two doors are raw ASGI endpoints dispatched ahead of Starlette's middleware and routing
(:class:`CPTokenApp`): they are the hot path, and a success needs no request or response
object. Everything else (health, metadata, JWKS) is ordinary Starlette.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from pathlib import PurePath
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from cp_token.authn import Authenticator
from cp_token.authn.cache import ANSWER_WITHIN
from cp_token.credential import parse_bearer
from cp_token.decision import TokenAsk, TokenDecision, Trace
from cp_token.errors import (
    NO_STORE,
    NO_STORE_EXCHANGE,
    CPTokenError,
    InternalError,
    MethodNotAllowed,
    Unauthenticated,
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
from cp_token.http.bodies import read_body
from cp_token.http.health import Readiness
from cp_token.http.health import health_routes as _health_routes
from cp_token.kube.objects import ObjectCache
from cp_token.metrics import Metrics, RequestMetrics
from cp_token.minters import IssuedToken, Minter
from cp_token.minters.jwt import JwtMinter
from cp_token.policy import RunnerPolicy
from cp_token.ratelimit import RateLimiter
from cp_token.runtime.clock import Clock, rfc3339
from cp_token.runtime.logs import audit

__all__ = [
    "CPTokenApp",
    "ExchangeConfig",
    "create_app",
    "create_metrics_app",
    "exchange_body",
    "token_body",
]

log = logging.getLogger(__name__)

EVENT_TOKEN = "token_request"
EVENT_EXCHANGE = "token_exchange"
ISSUED, OK = "issued", "ok"
_JSON = b"application/json"


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


@functools.lru_cache(maxsize=8)  # a token's expiry repeats for every token of that second
def _expires_at(second: int) -> str:
    return rfc3339(second)


def _expires_in(issued: IssuedToken, now: float) -> int | None:
    if issued.expires_at is None:
        return None
    return max(0, math.floor(issued.expires_at - now))


def token_body(issued: IssuedToken, now: float) -> bytes:
    """The JSON of a 200 from ``GET /token``: ``json.dumps``'s very text (ASCII, compact),
    written directly (the object is flat and its keys fixed)."""
    if issued.expires_at is None:
        expiry = '"expires_at":null,"expires_in":null'
    else:
        expires_in = max(0, math.floor(issued.expires_at - now))
        expires_at = _expires_at(math.floor(issued.expires_at))
        expiry = f'"expires_at":"{expires_at}","expires_in":{expires_in}'
    token = encode_basestring_ascii(issued.token)
    return f'{{"token":{token},"token_type":"Bearer",{expiry}}}'.encode()


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


class _Asgi:
    """An ASGI app given to a Starlette ``Route`` as is (a plain function would be taken for
    a request/response endpoint)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower-case), decoded as Latin-1 like Starlette."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _parse_get(scope: Scope, receive: Receive) -> TokenAsk:
    """``GET /token``: the bearer token (its length checked before anything else)."""
    method = scope["method"]
    if method != "GET":
        raise MethodNotAllowed(f"{method} is not allowed on /token; use GET")
    values = [v for k, v in scope["headers"] if k == b"authorization"]
    if len(values) > 1:  # which one a proxy or the app would read is anyone's guess
        raise Unauthenticated("more than one Authorization header", reason="malformed")
    return TokenAsk(credential=parse_bearer(values[0].decode("latin-1") if values else None))


def _exchange_parser(rules: ExchangeRules) -> Parser:
    async def parse(scope: Scope, receive: Receive) -> TokenAsk:
        """``POST /oauth2/token``: a form; ``Authorization`` and unknown fields are ignored."""
        method = scope["method"]
        if method != "POST":
            raise MethodNotAllowed(
                f"{method} is not allowed on /oauth2/token; use POST", allow="POST"
            )
        check_content_type(_header(scope, b"content-type"))
        form = parse_form(await read_body(Request(scope, receive), MAX_BODY_BYTES))
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


Parser = Callable[[Scope, Receive], Awaitable[TokenAsk]]
Renderer = Callable[[IssuedToken, TokenAsk, float], bytes]


@dataclass(kw_only=True)
class _Door:
    """One protocol in front of the decision, as a raw ASGI endpoint: parse, decide, render
    a success or map a refusal; audit and count every request, whatever happens (an
    unexpected exception is answered 503, never 500).

    No Starlette request or response object on the way to a success: the header list is
    fixed but for the length, and the body is built by the door's renderer.
    """

    event: str
    parse: Parser
    render: Renderer
    refuse: Callable[[CPTokenError], Response]
    headers: Mapping[str, str]
    decision: TokenDecision
    clock: Clock
    metrics: RequestMetrics
    _ok_headers: list[tuple[bytes, bytes]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ok_headers = [(b"content-type", _JSON)] + [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        start = time.perf_counter()
        client = scope.get("client")
        trace = Trace(peer=client[0] if client else None)
        try:
            ask = await self.parse(scope, receive)
            issued = await self.decision.decide(ask, trace)
            body = self.render(issued, ask, self.clock.time())
            status, headers = 200, [*self._ok_headers, (b"content-length", b"%d" % len(body))]
            outcome, reason = ISSUED, OK
        except CPTokenError as refusal:
            status, headers, body = self._refusal(refusal)
            outcome, reason = refusal.outcome, refusal.reason
        except Exception as exc:  # a bug anywhere in the pipeline: 503, never a 500
            internal = _unexpected(exc, self.event)
            status, headers, body = self._refusal(internal)
            outcome, reason = internal.outcome, internal.reason
        elapsed = time.perf_counter() - start
        self.metrics.request(outcome, reason, elapsed)
        self._audit(trace, outcome, reason, elapsed)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _refusal(self, refusal: CPTokenError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        response = self.refuse(refusal)
        return response.status_code, response.raw_headers, bytes(response.body)

    def _audit(self, trace: Trace, outcome: str, reason: str, elapsed: float) -> None:
        identity, issued = trace.identity, trace.issued
        audit(
            event=self.event,
            outcome=outcome,
            reason=reason,
            username=identity.username if identity else None,
            namespace=identity.namespace if identity else None,
            pod=identity.pod_name if identity else None,
            jti=(issued.jti if issued else None) or (identity.credential_id if identity else None),
            latency_ms=elapsed * 1000,
        )


class CPTokenApp(Starlette):
    """The CP's API port: Starlette for health, metadata and JWKS; the token doors first.

    ``/token`` and ``/oauth2/token`` are dispatched before Starlette's middleware and
    routing (the hot path). They are also routes of the app, so a scope this shortcut does
    not take (a ``root_path``) reaches the same endpoint through Starlette.
    """

    def __init__(
        self,
        *,
        doors: Mapping[str, ASGIApp],
        routes: list[BaseRoute],
        lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
    ) -> None:
        door_routes: list[BaseRoute] = [Route(path, _Asgi(door)) for path, door in doors.items()]
        super().__init__(routes=door_routes + routes, lifespan=lifespan)
        self.router.redirect_slashes = False  # /token/ is not /token: 404, not a redirect
        self._doors = dict(doors)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point: a token door directly, anything else through Starlette."""
        if scope["type"] == "http" and not scope.get("root_path"):
            door = self._doors.get(scope["path"])
            if door is not None:
                await door(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _json_route(path: str, body: Callable[[], bytes], headers: Mapping[str, str]) -> Route:
    """``GET path`` answering the JSON ``body()`` with ``headers``."""

    async def endpoint(request: Request) -> Response:
        return Response(body(), media_type="application/json", headers=dict(headers))

    return Route(path, endpoint, methods=["GET"])


def _metadata_routes(
    jwt_minter: JwtMinter | None, exchange: ExchangeConfig, rules: ExchangeRules
) -> list[BaseRoute]:
    """RFC 8414 metadata (when an issuer is known), and the ``jwt`` minter's JWKS and OIDC
    discovery."""
    routes: list[BaseRoute] = []
    # the jwt minter's own issuer first, so the metadata's `issuer` is its tokens' `iss`
    issuer = (jwt_minter.issuer if jwt_minter else None) or exchange.issuer
    if issuer is not None:
        metadata = authorization_server_metadata(
            issuer=issuer,
            token_endpoint=exchange.token_endpoint or f"{issuer.rstrip('/')}/oauth2/token",
            jwks_uri=jwt_minter.jwks_uri if jwt_minter else None,
            scopes=rules.scopes if rules.per_request else (),
        )
        metadata_body = json.dumps(metadata, separators=(",", ":")).encode()
        routes.append(
            _json_route(
                "/.well-known/oauth-authorization-server",
                lambda: metadata_body,
                {"Cache-Control": "public, max-age=300"},
            )
        )
    if jwt_minter is not None:
        publisher = jwt_minter
        cache = {"Cache-Control": f"public, max-age={publisher.jwks_max_age}"}
        routes += [
            _json_route("/.well-known/jwks.json", lambda: publisher.jwks_body, cache),
            _json_route(
                "/.well-known/openid-configuration",
                lambda: json.dumps(publisher.openid_configuration()).encode(),
                cache,
            ),
        ]
    return routes


def _doors(
    decision: TokenDecision, clock: Clock, metrics: RequestMetrics, rules: ExchangeRules
) -> dict[str, ASGIApp]:
    """``GET /token`` and ``POST /oauth2/token`` by path."""
    door = functools.partial(_Door, decision=decision, clock=clock, metrics=metrics)
    return {
        "/token": door(
            event=EVENT_TOKEN,
            parse=_parse_get,
            render=lambda issued, _ask, now: token_body(issued, now),
            refuse=error_response,
            headers=NO_STORE,
        ),
        "/oauth2/token": door(
            event=EVENT_EXCHANGE,
            parse=_exchange_parser(rules),
            render=exchange_body,
            refuse=exchange_error_response,
            headers=NO_STORE_EXCHANGE,
        ),
    }


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
    exchange = exchange or ExchangeConfig()
    jwt_minter = minter if isinstance(minter, JwtMinter) else None
    decision = TokenDecision(
        authenticator=authenticator,
        policy=policy,
        minter=minter,
        limiter=limiter,
        objects=objects,
        # the review cache's own bound, when it has one: label reads finish within it too
        answer_within=getattr(authenticator, "answer_within", ANSWER_WITHIN),
    )
    default_audiences = (jwt_minter.audience,) if jwt_minter else ()
    rules = ExchangeRules(
        audiences=default_audiences if exchange.audiences is None else exchange.audiences,
        scopes=exchange.scopes,
        per_request=jwt_minter is not None,
    )
    doors = _doors(decision, clock, metrics, rules)
    ready: Readiness = readiness or (lambda: minter.problem)
    routes = [*_health_routes(ready), *_metadata_routes(jwt_minter, exchange, rules)]
    app = CPTokenApp(doors=doors, routes=routes, lifespan=lifespan)
    app.state.metrics = metrics
    app.state.minter = minter
    app.state.authenticator = authenticator
    app.state.decision = decision
    return app


def create_metrics_app(metrics: Metrics, readiness: Readiness) -> Starlette:
    """The metrics port: ``/metrics`` (prometheus_client's own ASGI exposition), ``/healthz``,
    ``/readyz``."""
    exposition = Route("/metrics", _Asgi(metrics.asgi_app()), methods=["GET"])
    return Starlette(routes=[exposition, *_health_routes(readiness)])
