"""A stand-in for the platform's API server: it accepts only tokens minted by the CP.

``GET /whoami`` verifies the ``Authorization: Bearer`` JWT against the CP's JWKS (ES256 or
RS256 only; ``iss``, ``aud`` and ``exp`` checked) and answers 200 with the caller's
``sub``, ``session_id`` and ``exp``, or 401. ``GET /healthz`` answers ``ok``.

Run it with ``python examples/demo_api.py``. Environment:

``DEMO_API_LISTEN_ADDR``  ``host:port`` to listen on (default ``127.0.0.1:8001``)
``DEMO_JWKS_URL``         the CP's JWKS (default ``http://127.0.0.1:8080/.well-known/jwks.json``)
``DEMO_AUDIENCE``         the required ``aud`` (default ``ambient-api-server``)
``DEMO_ISSUER``           the required ``iss``; by default the ``issuer`` of the CP's
                          ``/.well-known/openid-configuration`` next to the JWKS
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import uvicorn
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

log = logging.getLogger("demo-api")

ALGORITHMS = ("ES256", "RS256")
"""The only signature algorithms accepted: what the CP's ``jwt`` minter signs with."""

JWKS_SUFFIX = "/.well-known/jwks.json"
DISCOVERY_SUFFIX = "/.well-known/openid-configuration"


class ConfigError(Exception):
    """A bad environment variable; ``main`` prints it as one line and exits 2."""


class KeysUnavailable(Exception):
    """The JWKS (or the discovery document) could not be fetched: answer 503, not 401."""


@dataclass(frozen=True)
class DemoConfig:
    """The demo API's settings, read once from the environment."""

    host: str
    port: int
    jwks_url: str
    audience: str
    issuer: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> DemoConfig:
        """Read and validate ``DEMO_*`` variables; raise :class:`ConfigError` on a bad one."""
        host, port = parse_listen_addr(env.get("DEMO_API_LISTEN_ADDR", "127.0.0.1:8001"))
        jwks_url = env.get("DEMO_JWKS_URL", "http://127.0.0.1:8080" + JWKS_SUFFIX)
        parts = urlsplit(jwks_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"DEMO_JWKS_URL: not an http(s) URL: {jwks_url!r}")
        issuer = env.get("DEMO_ISSUER") or None
        if issuer is None and not jwks_url.endswith(JWKS_SUFFIX):
            raise ConfigError(
                f"DEMO_ISSUER: required when DEMO_JWKS_URL does not end in {JWKS_SUFFIX}"
            )
        audience = env.get("DEMO_AUDIENCE", "ambient-api-server")
        if not audience:
            raise ConfigError("DEMO_AUDIENCE: must not be empty")
        return cls(host=host, port=port, jwks_url=jwks_url, audience=audience, issuer=issuer)


def parse_listen_addr(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``:8001`` means all interfaces, ``[::1]:8001`` is IPv6)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"DEMO_API_LISTEN_ADDR: expected host:port, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


class KeyCache:
    """The CP's JWKS (and issuer), fetched lazily, cached, re-fetched on an unknown ``kid``.

    Concurrent misses share one fetch, and re-fetches are at most one per
    ``min_refetch_secs``, so tokens with made-up ``kid`` values cannot make this hammer the CP.
    """

    def __init__(
        self,
        config: DemoConfig,
        client: httpx.AsyncClient,
        *,
        ttl_secs: float = 300.0,
        min_refetch_secs: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Remember where the keys are; nothing is fetched until the first request."""
        self._config = config
        self._client = client
        self._ttl = ttl_secs
        self._min_refetch = min_refetch_secs
        self._clock = clock
        self._lock = asyncio.Lock()
        self._keys: KeySet | None = None
        self._issuer: str | None = config.issuer
        self._fetched_at = float("-inf")

    async def keys(self, *, refresh: bool = False) -> KeySet:
        """The current key set; ``refresh`` forces a re-fetch unless one just happened."""
        async with self._lock:
            age = self._clock() - self._fetched_at
            stale = self._keys is None or age >= self._ttl
            if stale or (refresh and age >= self._min_refetch):
                await self._fetch()
            assert self._keys is not None
            return self._keys

    async def issuer(self) -> str:
        """The required ``iss``: configured, or discovered next to the JWKS."""
        if self._issuer is None:
            async with self._lock:
                if self._issuer is None:
                    url = self._config.jwks_url.removesuffix(JWKS_SUFFIX) + DISCOVERY_SUFFIX
                    document = await self._get_json(url)
                    issuer = document.get("issuer")
                    if not isinstance(issuer, str) or not issuer:
                        raise KeysUnavailable(f"no issuer in {url}")
                    self._issuer = issuer
        return self._issuer

    async def _fetch(self) -> None:
        document = await self._get_json(self._config.jwks_url)
        try:
            self._keys = KeySet.import_key_set(document)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise KeysUnavailable(f"unusable JWKS: {type(exc).__name__}") from exc
        self._fetched_at = self._clock()
        log.info("fetched %d key(s) from %s", len(self._keys.keys), self._config.jwks_url)

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            response = await self._client.get(url)
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise KeysUnavailable(f"{url}: {type(exc).__name__}") from exc
        if not isinstance(document, dict):
            raise KeysUnavailable(f"{url}: not a JSON object")
        return document


class InvalidToken(Exception):
    """The bearer token is missing, malformed, badly signed, expired or not for us."""


async def verify(token: str, cache: KeyCache, audience: str) -> dict[str, Any]:
    """Verify ``token`` and return its claims, or raise :class:`InvalidToken`."""
    try:
        try:
            decoded = jwt.decode(token, await cache.keys(), algorithms=list(ALGORITHMS))
        except InvalidKeyIdError:
            # The CP may have published a new key since the last fetch (rotation).
            decoded = jwt.decode(token, await cache.keys(refresh=True), algorithms=list(ALGORITHMS))
        registry = jwt.JWTClaimsRegistry(
            leeway=30,
            iss={"essential": True, "value": await cache.issuer()},
            aud={"essential": True, "value": audience},
            exp={"essential": True},
            sub={"essential": True},
        )
        registry.validate(decoded.claims)
    except (JoseError, ValueError, TypeError) as exc:
        # The exception names what failed (signature, exp, aud, ...), never the token.
        raise InvalidToken(getattr(exc, "error", None) or type(exc).__name__) from exc
    return dict(decoded.claims)


def bearer_token(request: Request) -> str | None:
    """The credentials of an ``Authorization: Bearer`` header (scheme case-insensitive)."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def unauthorized(description: str, *, challenge: str = 'Bearer error="invalid_token"') -> Response:
    """A 401 in the RFC 6750 shape."""
    return JSONResponse(
        {"error": "invalid_token", "error_description": description},
        status_code=401,
        headers={"WWW-Authenticate": challenge},
    )


async def whoami(request: Request) -> Response:
    """``GET /whoami``: who the verified token says the caller is."""
    token = bearer_token(request)
    if token is None:
        return unauthorized("Bearer credentials required", challenge="Bearer")
    cache: KeyCache = request.app.state.keys
    try:
        claims = await verify(token, cache, request.app.state.config.audience)
    except InvalidToken as exc:
        log.info("whoami: 401 (%s)", exc)
        return unauthorized(f"token rejected: {exc}")
    except KeysUnavailable as exc:
        log.warning("whoami: 503 (%s)", exc)
        return JSONResponse(
            {"error": "temporarily_unavailable", "error_description": str(exc)},
            status_code=503,
            headers={"Retry-After": "5"},
        )
    log.info("whoami: 200 sub=%s", claims.get("sub"))
    return JSONResponse(
        {"sub": claims.get("sub"), "session_id": claims.get("session_id"), "exp": claims["exp"]}
    )


async def healthz(request: Request) -> Response:
    """``GET /healthz``: the process serves."""
    return PlainTextResponse("ok")


def create_app(config: DemoConfig, client: httpx.AsyncClient | None = None) -> Starlette:
    """Build the demo API; ``client`` (for tests) is used instead of a fresh one."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # trust_env=False: proxy variables are ignored, as everywhere in cp-token.
        async with contextlib.AsyncExitStack() as stack:
            http = client
            if http is None:
                http = await stack.enter_async_context(
                    httpx.AsyncClient(timeout=5.0, trust_env=False)
                )
            app.state.keys = KeyCache(config, http)
            yield

    app = Starlette(
        routes=[Route("/whoami", whoami, methods=["GET"]), Route("/healthz", healthz)],
        lifespan=lifespan,
    )
    app.state.config = config
    return app


def main() -> int:
    """Run the demo API until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = DemoConfig.from_env()
    except ConfigError as exc:
        print(f"demo-api: {exc}", file=sys.stderr)
        return 2
    server = _Server(
        uvicorn.Config(create_app(config), host=config.host, port=config.port, log_level="info")
    )
    server.run()
    return 0


class _Server(uvicorn.Server):
    """uvicorn that exits 0 on SIGTERM (it would otherwise re-raise the signal after draining)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop)
        yield

    def _stop(self) -> None:
        self.should_exit = True


if __name__ == "__main__":
    sys.exit(main())
