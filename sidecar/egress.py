"""HTTP egress: ``ANY /upstream/<name>/<path>?<query>`` forwarded with the held token.

The sealed sidecar's answer to "the pod needs to call the API, but no container but the
sidecar may hold the bearer" (egress credential injection, SPEC "Sealed mode"). The same
method, path (under the upstream's base), query and body go to the upstream over TLS with
``Authorization: Bearer <held token>``; the answer comes back as it arrives.

- Headers: the caller's ``Authorization``, ``Cookie``, ``Proxy-*``, hop-by-hop headers
  (``Connection`` and what it names, ``Keep-Alive``, ``TE``, ``Trailer``,
  ``Transfer-Encoding``, ``Upgrade``), ``Expect`` and the ``Ambient-Token-Request`` opt-in
  are dropped; ``Host`` is the upstream's. The answer keeps the upstream's headers minus
  the hop-by-hop ones (and its ``Date``: the sidecar's server writes one), and any header
  whose value holds the token is dropped, so an upstream that echoes credentials in a
  header cannot hand the bearer to the pod.
- Bodies stream both ways (a 10 MiB upload is never held whole; server-sent events reach
  the caller as they are sent). A request body is read ahead up to 64 KiB: a call whose
  body fitted is repeated once, with a fresh token, when the upstream answers 401.
- Redirects are handed back, never followed, and never carry the token.
- Time: connecting and waiting for the response head within ``timeout`` (504 past it); the
  caller's own pace (a slow upload) and the streamed answer are not timed.
- Errors: an unknown name 404, a dot segment 400, no token 503 + ``Retry-After``, an
  upstream that cannot be reached 502, each a JSON reason; the guard's refusals 403.

The upstream side is httpx (a maintained HTTP client: pooled keep-alive connections, TLS,
HTTP/1.1 parsing by h11). It is loaded only by a sidecar with upstreams: a plain sidecar
never imports this module.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import logging
import re
import ssl
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

# httpx's command line (httpx._main) imports rich, click and pygments when they happen to be
# installed: ~6 MiB per pod for code the sidecar never runs. httpx falls back to a stub.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

import httpx  # noqa: E402

from cp_token.http.edge import absolute_form  # noqa: E402

from .app import refusal  # noqa: E402
from .asgi import Receive, Scope, Send  # noqa: E402
from .bearer import HeldBearer, NoToken  # noqa: E402
from .sealed import ProxyMetrics, send_json  # noqa: E402

__all__ = [
    "BUFFERED_BODY",
    "EgressApp",
    "Upstream",
    "request_headers",
    "response_headers",
    "upstream_client",
]

log = logging.getLogger("sidecar.egress")

BUFFERED_BODY = 64 * 1024  # a body up to this size is read first, and a 401 repeats the call
MAX_CONNECTIONS = 256  # towards all upstreams together; a call beyond waits (within timeout)
MAX_KEEPALIVE = 32
KEEPALIVE_EXPIRY = 30.0
# A response without a length (a stream) is watched for the caller going away; one with a
# length above this too, so that a dropped download stops reading from the upstream.
WATCH_ABOVE = 1024 * 1024

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
_REQUEST_DROPPED = HOP_BY_HOP | {
    b"authorization",
    b"cookie",
    b"host",
    b"expect",  # the sidecar's server answers 100-continue itself
    b"ambient-token-request",
}
_RESPONSE_DROPPED = HOP_BY_HOP | {b"date"}
_SEPARATORS = re.compile(r"[/\\]")
_NO_STORE = [(b"cache-control", b"no-store")]


@dataclass(frozen=True)
class Upstream:
    """A configured upstream: ``name`` and its base URL (no trailing slash)."""

    name: str
    base: str


def _connection_named(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The header names a ``Connection`` header lists (they are hop-by-hop too)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return named


def request_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The caller's headers as the upstream gets them (without the bearer, added after)."""
    headers = list(headers)
    named = _connection_named(headers)
    return [
        (name, value)
        for name, value in headers
        if (low := name.lower()) not in _REQUEST_DROPPED
        and low not in named
        and not low.startswith(b"proxy-")
    ]


def response_headers(
    headers: Iterable[tuple[bytes, bytes]], token: str
) -> list[tuple[bytes, bytes]]:
    """The upstream's headers as the caller gets them: no hop-by-hop header, and none whose
    value holds ``token``."""
    headers = list(headers)
    named = _connection_named(headers)
    secret = token.encode()
    return [
        (low, value)
        for name, value in headers
        if (low := name.lower()) not in _RESPONSE_DROPPED
        and low not in named
        and not low.startswith(b"proxy-")
        and secret not in value
    ]


def upstream_client(ca_file: str | None, timeout: float) -> httpx.AsyncClient:
    """The pooled client towards every upstream: TLS verified against ``ca_file`` (or the
    system roots), no proxy variables (the token never travels through a proxy), no
    redirects followed, no cookies kept (each caller keeps its own)."""
    context = ssl.create_default_context(cafile=ca_file)
    no_cookies = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(
        verify=context,
        trust_env=False,
        follow_redirects=False,
        cookies=no_cookies,
        limits=httpx.Limits(
            max_connections=MAX_CONNECTIONS,
            max_keepalive_connections=MAX_KEEPALIVE,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        ),
        # the head's deadline is the caller's (EgressApp); bodies are not timed
        timeout=httpx.Timeout(connect=timeout, read=None, write=None, pool=timeout),
    )


class _Refused(Exception):
    """The request names no upstream, or a path that may not be forwarded."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


class CallerGone(Exception):
    """The caller went away while its request body was being forwarded."""


class _Body:
    """A request body read ahead up to :data:`BUFFERED_BODY`: whole (repeatable) or not."""

    def __init__(self, chunks: list[bytes], complete: bool) -> None:
        self.chunks = chunks
        self.complete = complete

    @classmethod
    async def read(cls, receive: Receive) -> _Body:
        chunks: list[bytes] = []
        size = 0
        while size <= BUFFERED_BODY:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise CallerGone
            chunk = message.get("body", b"")
            if chunk:
                chunks.append(chunk)
                size += len(chunk)
            if not message.get("more_body", False):
                return cls(chunks, True)
        return cls(chunks, False)


class EgressApp:
    """The ASGI app behind ``/upstream/``: guard, upstream, token, forward, relay."""

    def __init__(
        self,
        upstreams: Iterable[Upstream],
        bearer: HeldBearer,
        metrics: ProxyMetrics,
        client: httpx.AsyncClient,
        *,
        timeout: float,
        prefix: str = "/upstream/",
    ) -> None:
        self._upstreams: Mapping[str, Upstream] = {u.name: u for u in upstreams}
        self._bearer = bearer
        self._metrics = metrics
        self._client = client
        self._timeout = timeout
        self._prefix = prefix.encode()

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point (``/upstream/...``)."""
        reason = refusal(scope["headers"], absolute_target=absolute_form(scope))
        if reason is not None:
            await send_json(send, 403, "access_denied", reason)
            return
        try:
            upstream, url = self._target(scope)
        except _Refused as exc:
            await send_json(send, exc.status, exc.error, exc.description)
            return
        try:
            token = await self._bearer.current()
        except NoToken as exc:
            self._metrics.http(upstream.name, 503)
            retry = [(b"retry-after", str(exc.retry_after).encode())]
            await send_json(send, 503, "temporarily_unavailable", exc.reason, retry)
            return
        started = time.monotonic()
        try:
            status = await self._forward(scope, receive, send, upstream, url, token)
        except CallerGone:
            return
        if log.isEnabledFor(logging.DEBUG):  # never the path, the query or a body
            fields = {
                "upstream": upstream.name,
                "method": scope["method"],
                "status": status,
                "seconds": round(time.monotonic() - started, 4),
            }
            log.debug("proxied", extra={"fields": fields})

    def _target(self, scope: Scope) -> tuple[Upstream, str]:
        """(upstream, URL) for the request; raises :class:`_Refused`."""
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        raw = raw.partition(b"?")[0]  # some servers leave the query on it; it is never path
        if not raw.startswith(self._prefix):
            raise _Refused(404, "unknown_upstream", "no such upstream")
        name, slash, rest = raw[len(self._prefix) :].partition(b"/")
        upstream = self._upstreams.get(name.decode("latin-1"))
        if upstream is None:
            known = ", ".join(sorted(self._upstreams))
            raise _Refused(
                404, "unknown_upstream", f"no upstream of that name (configured: {known})"
            )
        path = (slash + rest).decode("latin-1")
        segments = _SEPARATORS.split(urllib.parse.unquote(path))
        if "." in segments or ".." in segments:
            raise _Refused(
                400, "invalid_request", "dot segments (. and ..) are refused in the path"
            )
        query: bytes = scope["query_string"]
        url = upstream.base + path + ("?" + query.decode("latin-1") if query else "")
        return upstream, url

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, upstream: Upstream, url: str, token: str
    ) -> int:
        """Forward the call (once more with a fresh token after a 401 when its body allows),
        relay the answer; returns the status the caller got."""
        method: str = scope["method"]
        headers = request_headers(scope["headers"])
        body = await _Body.read(receive)
        response = await self._send_or_answer(method, url, headers, body, receive, send, token)
        if response is None:
            return self._count(upstream, 502)
        if response.status_code == 401:
            fresh = await self._bearer.after_rejection(token)
            if fresh is not None and body.complete:
                await response.aclose()
                token = fresh
                response = await self._send_or_answer(
                    method, url, headers, body, receive, send, token
                )
                if response is None:
                    return self._count(upstream, 502)
        self._count(upstream, response.status_code)
        await self._relay(response, receive, send, token)
        return response.status_code

    def _count(self, upstream: Upstream, status: int) -> int:
        self._metrics.http(upstream.name, status)
        return status

    async def _send_or_answer(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: _Body,
        receive: Receive,
        send: Send,
        token: str,
    ) -> httpx.Response | None:
        """The upstream's response (head received, body not read), or None after answering
        502/504 to the caller."""
        auth = [*headers, (b"authorization", f"Bearer {token}".encode())]
        try:
            async with asyncio.timeout(self._timeout) as deadline:
                content = (
                    b"".join(body.chunks)
                    if body.complete
                    else self._stream(body.chunks, receive, deadline)
                )
                request = httpx.Request(method, url, headers=auth, content=content)
                return await self._client.send(request, stream=True)
        except CallerGone:
            raise
        except (TimeoutError, httpx.TimeoutException):
            await send_json(
                send,
                504,
                "upstream_timeout",
                f"the upstream did not answer within {self._timeout:g} s",
            )
            return None
        except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
            log.warning("upstream unreachable", extra={"fields": {"error": type(exc).__name__}})
            await send_json(
                send, 502, "upstream_unreachable", f"the upstream cannot be reached ({_why(exc)})"
            )
            return None

    async def _stream(
        self, head: list[bytes], receive: Receive, deadline: asyncio.Timeout
    ) -> AsyncIterator[bytes]:
        """The read-ahead chunks, then the rest of the caller's body as it arrives. The
        caller's pace is not timed; each write to the upstream is (the head's deadline)."""
        loop = asyncio.get_running_loop()
        for chunk in head:
            yield chunk
        while True:
            deadline.reschedule(None)
            message = await receive()
            if message["type"] == "http.disconnect":
                raise CallerGone
            deadline.reschedule(loop.time() + self._timeout)
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    async def _relay(
        self, response: httpx.Response, receive: Receive, send: Send, token: str
    ) -> None:
        """The upstream's answer to the caller as it arrives; stopped when the caller goes."""
        headers = response_headers(response.headers.raw, token)
        length = response.headers.get("content-length")
        watch = length is None or not length.isdigit() or int(length) > WATCH_ABOVE
        try:
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": headers}
            )
            if not watch:
                await self._pump(response, send)
                return
            pump = asyncio.ensure_future(self._pump(response, send))
            gone = asyncio.ensure_future(_disconnect(receive))
            try:
                await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                pump.cancel()
                await asyncio.gather(pump, gone, return_exceptions=True)
            if pump.done() and not pump.cancelled():
                pump.result()
        except (httpx.HTTPError, OSError) as exc:
            # The answer broke off: the caller's connection is closed unfinished, so the
            # truncation shows (no final chunk) instead of passing for a whole body.
            log.warning(
                "upstream answer broke off", extra={"fields": {"error": type(exc).__name__}}
            )
        finally:
            await response.aclose()

    async def _pump(self, response: httpx.Response, send: Send) -> None:
        async for chunk in response.aiter_raw():
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnect(receive: Receive) -> None:
    """Returns once the caller has gone."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _why(exc: BaseException) -> str:
    """A short reason for a failed upstream call (its type, and the cause's for a wrapper)."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, httpx.HTTPError) and cause is not None:
        return f"{type(exc).__name__}: {type(cause).__name__}"
    return type(exc).__name__
