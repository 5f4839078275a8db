"""The sidecar's routes: ``/token`` (GET, POST) over the holder, and the exempt probes.

Plain ASGI over :mod:`sidecar.asgi`'s exact-path router, no framework: one sidecar runs in
every session pod, so its resident memory is multiplied by the pods, and ``/token`` is the
hot path. It serves pre-rendered JSON (only ``expires_in`` changes between two requests).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

from cp_token.client import FetchedToken
from cp_token.http.edge import absolute_form
from cp_token.http.serving import background
from cp_token.settings.common import is_loopback_host

from .asgi import TEXT, ASGIApp, Lifespan, Receive, Router, Scope, Send, plain_endpoint
from .holder import TokenHolder
from .metrics import CONTENT_TYPE, SidecarMetrics
from .refresher import Refresher

__all__ = ["TokenEndpoint", "create_app", "create_metrics_app"]

log = logging.getLogger("sidecar.app")

MAX_MIN_TTL = 86400.0
_HOST = re.compile(r"\[(?P<v6>[0-9A-Fa-f:.]+)\](?::\d+)?|(?P<name>[^:\[\]]+)(?::\d+)?")
_JSON_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]


# RFC 6750 §3.1: a 401 names the scheme and the error (the CP's own header on its 401)
_INVALID_TOKEN_CHALLENGE = (b"www-authenticate", b'Bearer error="invalid_token"')


def rejection_error(status: int) -> tuple[str, list[tuple[bytes, bytes]]]:
    """The ``error`` and headers a relayed refusal of this pod by the CP (401 or 403) is
    answered with: ``invalid_token`` with a Bearer challenge, or ``access_denied``."""
    if status == 401:
        return "invalid_token", [_INVALID_TOKEN_CHALLENGE]
    return "access_denied", []


def _error(error: str, description: str) -> bytes:
    return json.dumps({"error": error, "error_description": description}).encode()


@functools.lru_cache(maxsize=64)  # consumers send the same Host over and over
def loopback_host_header(host: str | None) -> bool:
    """True when a ``Host`` header names a loopback host (``localhost``, 127.x, ``[::1]``)."""
    if not host:
        return False
    m = _HOST.fullmatch(host)
    if not m:
        return False
    return is_loopback_host(m.group("v6") or m.group("name"))


# Headers a proxy adds: a request carrying one did not come straight from the pod.
PROXY_HEADERS = {
    b"x-forwarded-for": "X-Forwarded-For",
    b"forwarded": "Forwarded",
    b"x-real-ip": "X-Real-IP",
    b"via": "Via",
}


def refusal(
    headers: Iterable[tuple[bytes, bytes]] | Mapping[bytes, bytes],
    *,
    absolute_target: bool = False,
) -> str | None:
    """Why a token request must be refused (403), or None.

    ``headers`` are the request's as sent (ASGI: lower-case names, duplicates kept).
    Browsers always send ``Origin`` on cross-origin requests and cannot add the
    ``Ambient-Token-Request`` header without a CORS preflight we never grant; a proxied
    request carries a proxy header or an absolute-form target; a DNS-rebound one carries a
    foreign ``Host``. A duplicated ``Host`` or opt-in header is refused rather than guessed
    at: two parsers may pick different ones.
    """
    if absolute_target:
        return "absolute-form request targets (proxy requests) are refused"
    hosts: list[bytes] = []
    opt_ins: list[bytes] = []
    for name, value in headers.items() if isinstance(headers, Mapping) else headers:
        if name == b"host":
            hosts.append(value)
        elif name == b"ambient-token-request":
            opt_ins.append(value)
        elif name == b"origin":
            return "requests with an Origin header are refused"
        elif name in PROXY_HEADERS:
            return f"requests with a {PROXY_HEADERS[name]} header are refused"
        elif name.startswith(b"x-forwarded-"):  # -Host, -Proto, -Port, ...: a proxy's too
            return "requests with X-Forwarded-* headers are refused"
    if len(hosts) > 1:
        return "requests with more than one Host header are refused"
    host = (hosts[0] if hosts else b"").decode("latin-1")
    if not loopback_host_header(host):
        return f"Host {host[:64]!r} is not a loopback name (use 127.0.0.1 or localhost)"
    if len(opt_ins) != 1 or opt_ins[0].lower() != b"true":
        return "the header 'Ambient-Token-Request: true' is required, exactly once"
    return None


def parse_min_ttl(query_string: bytes, default: float) -> float:
    """``?min_ttl=N`` (seconds, 0..86400, percent-decoded as any query value); raises
    ValueError with the reason, also when it is given more than once."""
    if not query_string:
        return default
    try:
        params = urllib.parse.parse_qs(
            query_string.decode("latin-1"), keep_blank_values=True, max_num_fields=64
        )
    except ValueError:
        raise ValueError("the query string has too many parameters") from None
    values = params.get("min_ttl")
    if values is None:
        return default
    if len(values) > 1:
        raise ValueError("min_ttl is given more than once")
    value = values[0]
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"min_ttl must be a number of seconds, got {value[:32]!r}") from None
    if not math.isfinite(number) or not 0 <= number <= MAX_MIN_TTL:
        raise ValueError(f"min_ttl must be between 0 and {MAX_MIN_TTL:g} seconds")
    return number


class TokenEndpoint:
    """``GET /token`` (from cache, ``?min_ttl``) and ``POST /token`` (force a fresh one)."""

    def __init__(self, refresher: Refresher, metrics: SidecarMetrics, min_ttl: float) -> None:
        self._refresher = refresher
        self._holder = refresher.holder
        self._metrics = metrics
        self._min_ttl = min_ttl
        self._rendered: tuple[FetchedToken, bytes] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        method: str = scope["method"]
        status, extra, body = await self._handle(method, scope)
        headers = [*_JSON_HEADERS, *extra, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _handle(self, method: str, scope: Scope) -> tuple[int, list[Any], bytes]:
        if method not in ("GET", "POST"):
            self._metrics.request(method, "not_allowed")
            body = _error("method_not_allowed", "use GET (or POST to force a fresh token)")
            return 405, [(b"allow", b"GET, POST")], body
        reason = refusal(scope["headers"], absolute_target=absolute_form(scope))
        if reason is not None:
            self._metrics.request(method, "refused")
            return 403, [], _error("access_denied", reason)
        if self._holder.rejection is not None:
            self._refresher.check_sa_token()  # a rotated SA token is tried at once
        if method == "GET":
            try:
                min_ttl = parse_min_ttl(scope["query_string"], self._min_ttl)
            except ValueError as exc:
                self._metrics.request(method, "bad_request")
                return 400, [], _error("invalid_request", str(exc))
            if self._holder.should_fetch(min_ttl):
                await self._refresher.fetch()
        elif self._holder.should_force():
            await self._refresher.fetch()
        return self._answer(method)

    def _answer(self, method: str) -> tuple[int, list[Any], bytes]:
        holder = self._holder
        serving = holder.serving()
        if serving is not None:
            self._metrics.request(method, "ok")
            return 200, [], self._render(*serving)
        rejection = holder.rejection
        if rejection is not None:
            self._metrics.request(method, "rejected")
            error, headers = rejection_error(rejection.status)
            return rejection.status, headers, _error(error, rejection.description)
        self._metrics.request(method, "unavailable")
        why = holder.last_error or "no token fetched yet"
        retry_after = str(holder.advertised_retry_after()).encode()
        body = _error("temporarily_unavailable", f"no unexpired token held: {why}")
        return 503, [(b"retry-after", retry_after)], body

    def _render(self, token: FetchedToken, remaining: float | None) -> bytes:
        """The CP's JSON for ``token``; only ``expires_in`` is recomputed per request."""
        rendered = self._rendered
        if rendered is None or rendered[0] is not token:
            head = {"token": token.token, "token_type": "Bearer", "expires_at": token.expires_at}
            prefix = (json.dumps(head, separators=(",", ":"))[:-1] + ',"expires_in":').encode()
            rendered = self._rendered = (token, prefix)
        expires_in = b"null" if remaining is None else str(max(0, int(remaining))).encode()
        return rendered[1] + expires_in + b"}"


def probe_routes(holder: TokenHolder, metrics: SidecarMetrics) -> dict[str, ASGIApp]:
    """``/healthz``, ``/readyz`` and ``/metrics``: no secret, no identity, no configuration,
    no header required."""

    def healthz() -> tuple[int, bytes, bytes]:
        return 200, b"ok", TEXT

    def readyz() -> tuple[int, bytes, bytes]:
        # SIDECAR_METRICS_ADDR is reachable from the network: a reason class only, never
        # the CP's words (they name the pod's identity and the CP's policy)
        why = holder.unready_class()
        if why is None:
            return 200, b"ready", TEXT
        return 503, f"not ready: {why}".encode(), TEXT

    def metrics_page() -> tuple[int, bytes, bytes]:
        return 200, metrics.render(), CONTENT_TYPE

    return {
        "/healthz": plain_endpoint(healthz),
        "/readyz": plain_endpoint(readyz),
        "/metrics": plain_endpoint(metrics_page),
    }


def create_app(
    refresher: Refresher,
    *,
    metrics: SidecarMetrics,
    min_ttl: float,
    on_fatal: Callable[[BaseException], None] | None = None,
    token_route: ASGIApp | None = None,
    prefixes: Mapping[str, ASGIApp] | None = None,
    contexts: Sequence[Lifespan] = (),
) -> Router:
    """The sidecar's main app. Its lifespan runs the refresh loop; should the loop die,
    ``on_fatal`` is called (the CLI stops the process with a non-zero exit).

    Sealed mode (:func:`sidecar.sealed.sealed_parts`) passes ``token_route`` (``/token``
    refused), ``prefixes`` (the egress routes) and ``contexts`` entered for the lifespan
    (the upstream pool, the gRPC listener)."""

    def loop_died(name: str, exc: BaseException) -> None:
        if on_fatal is not None:
            on_fatal(exc)

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        try:
            async with (
                background({"sidecar-refresh": refresher.run()}, loop_died),
                contextlib.AsyncExitStack() as stack,
            ):
                for context in contexts:
                    await stack.enter_async_context(context())
                yield
        finally:
            await refresher.source.aclose()

    routes: dict[str, ASGIApp] = {
        "/token": token_route or TokenEndpoint(refresher, metrics, min_ttl),
        **probe_routes(refresher.holder, metrics),
    }
    return Router(routes, lifespan=lifespan, prefixes=prefixes)


def create_metrics_app(holder: TokenHolder, metrics: SidecarMetrics) -> Router:
    """The app for ``SIDECAR_METRICS_ADDR``: the probes and metrics, never ``/token``."""
    return Router(probe_routes(holder, metrics))
