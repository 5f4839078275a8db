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

The upstream side is :mod:`sidecar.egress_pool` (httptools parses what upstreams send; the
reasons it is not httpx are written there, with the figures).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

from cp_token.http.edge import absolute_form

from .app import refusal, rejection_error
from .asgi import Receive, Scope, Send
from .bearer import HeldBearer, NoToken
from .egress_pool import Origin, UpstreamError, UpstreamPool, UpstreamResponse, split_base
from .sealed import ProxyMetrics, send_json

__all__ = [
    "BUFFERED_BODY",
    "EgressApp",
    "Upstream",
    "request_headers",
    "response_headers",
]

log = logging.getLogger("sidecar.egress")

BUFFERED_BODY = 64 * 1024  # a body up to this size is read first, and a 401 repeats the call
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
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # no header value may carry one
_SEPARATORS = re.compile(r"[/\\]")


@dataclass(frozen=True)
class Upstream:
    """A configured upstream: its ``name``, ``origin`` and base ``path`` (no trailing
    slash, percent-encoded)."""

    name: str
    origin: Origin
    path: bytes

    @classmethod
    def from_url(cls, name: str, url: str) -> Upstream:
        """From a base URL the settings validated (``https://host[:port][/base]``)."""
        origin, path = split_base(url)
        return cls(name, origin, urllib.parse.quote(path, safe="/%:@!$&'()*+,;=~").encode())


def _connection_named(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The header names a ``Connection`` header lists (they are hop-by-hop too)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return named


def request_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The caller's headers as the upstream gets them (without the bearer, added after).
    ASGI gives header names in lower case."""
    headers = list(headers)
    named = _connection_named(headers)
    return [
        (name, value)
        for name, value in headers
        if name not in _REQUEST_DROPPED and name not in named and not name.startswith(b"proxy-")
    ]


def response_headers(
    headers: Iterable[tuple[bytes, bytes]], token: str
) -> list[tuple[bytes, bytes]]:
    """The upstream's headers as the caller gets them: no hop-by-hop header, none whose
    value holds ``token``, none with a control character (the sidecar's server would refuse
    to write it)."""
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
        and not _CONTROL.search(value)
    ]


class _Refused(Exception):
    """The request names no upstream, or a path that may not be forwarded."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


class CallerGone(Exception):
    """The caller went away while its request body was being read or forwarded."""


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
        pool: UpstreamPool,
        *,
        timeout: float,
        prefix: str = "/upstream/",
    ) -> None:
        self._upstreams: Mapping[str, Upstream] = {u.name: u for u in upstreams}
        self._bearer = bearer
        self._metrics = metrics
        self._pool = pool
        self._timeout = timeout
        self._prefix = prefix.encode()

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._pool.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point (``/upstream/...``)."""
        reason = refusal(scope["headers"], absolute_target=absolute_form(scope))
        if reason is not None:
            await send_json(send, 403, "access_denied", reason)
            return
        try:
            upstream, target = self._target(scope)
        except _Refused as exc:
            await send_json(send, exc.status, exc.error, exc.description)
            return
        try:
            token = await self._bearer.current()
        except NoToken as exc:
            await self._no_token(send, upstream, exc)
            return
        started = time.monotonic()
        try:
            status = await self._forward(scope, receive, send, upstream, target, token)
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

    async def _no_token(self, send: Send, upstream: Upstream, exc: NoToken) -> None:
        """Nothing to send the call with: the CP's refusal of this pod relayed as ``GET
        /token`` relays it (401 or 403 with its ``error_description``: retrying will not
        help), else 503 with ``Retry-After``."""
        if exc.rejected is not None:
            self._metrics.http(upstream.name, exc.rejected)
            error, headers = rejection_error(exc.rejected)
            await send_json(send, exc.rejected, error, exc.description or exc.reason, headers)
            return
        self._metrics.http(upstream.name, 503)
        retry = [(b"retry-after", str(exc.retry_after).encode())]
        await send_json(send, 503, "temporarily_unavailable", exc.reason, retry)

    def _target(self, scope: Scope) -> tuple[Upstream, bytes]:
        """(upstream, request target) for the request; raises :class:`_Refused`."""
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
        path = slash + rest
        segments = _SEPARATORS.split(urllib.parse.unquote(path.decode("latin-1")))
        if "." in segments or ".." in segments:
            raise _Refused(
                400, "invalid_request", "dot segments (. and ..) are refused in the path"
            )
        target = upstream.path + path
        query: bytes = scope["query_string"]
        if query:
            target += b"?" + query
        if not target.startswith(b"/"):
            target = b"/" + target
        if any(c <= 0x20 or c == 0x7F for c in target):
            raise _Refused(400, "invalid_request", "the path or query has a space or control byte")
        return upstream, target

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        upstream: Upstream,
        target: bytes,
        token: str,
    ) -> int:
        """Forward the call (once more with a fresh token after a 401 when its body allows),
        relay the answer; returns the status the caller got."""
        method: str = scope["method"]
        headers = request_headers(scope["headers"])
        body = await _Body.read(receive)
        response = await self._send(method, upstream, target, headers, body, receive, send, token)
        if response is None:
            return 502
        if response.status == 401:
            fresh = await self._bearer.after_rejection(token)
            if fresh is not None and body.complete:
                response.close()
                token = fresh
                response = await self._send(
                    method, upstream, target, headers, body, receive, send, token
                )
                if response is None:
                    return 502
        self._metrics.http(upstream.name, response.status)
        await self._relay(response, receive, send, token)
        return response.status

    async def _send(
        self,
        method: str,
        upstream: Upstream,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: _Body,
        receive: Receive,
        send: Send,
        token: str,
    ) -> UpstreamResponse | None:
        """The upstream's response (head received, body not read), or None after answering
        502/504 to the caller (and counting it)."""
        auth = [*headers, (b"authorization", b"Bearer " + token.encode())]
        try:
            async with asyncio.timeout(self._timeout) as deadline:
                content = (
                    b"".join(body.chunks)
                    if body.complete
                    else self._stream(body.chunks, receive, deadline)
                )
                response = await self._pool.request(upstream.origin, method, target, auth, content)
            if 200 <= response.status <= 599:
                return response
            response.close()
            raise UpstreamError(f"the upstream answered status {response.status}")
        except CallerGone:
            raise
        except TimeoutError:
            self._metrics.http(upstream.name, 504)
            await send_json(
                send,
                504,
                "upstream_timeout",
                f"the upstream did not answer within {self._timeout:g} s",
            )
        except UpstreamError as exc:
            self._metrics.http(upstream.name, 502)
            log.warning(
                "upstream unreachable",
                extra={"fields": {"upstream": upstream.name, "error": str(exc)}},
            )
            await send_json(
                send, 502, "upstream_unreachable", f"the upstream cannot be reached: {exc}"
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
        self, response: UpstreamResponse, receive: Receive, send: Send, token: str
    ) -> None:
        """The upstream's answer to the caller as it arrives; stopped when the caller goes."""
        headers = response_headers(response.headers, token)
        length = next((v for n, v in response.headers if n.lower() == b"content-length"), None)
        watch = length is None or not length.isdigit() or int(length) > WATCH_ABOVE
        try:
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
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
        except UpstreamError as exc:
            # The answer broke off: the caller's connection is closed unfinished, so the
            # truncation shows (no final chunk) instead of passing for a whole body.
            log.warning("upstream answer broke off", extra={"fields": {"error": str(exc)}})
        finally:
            response.close()

    @staticmethod
    async def _pump(response: UpstreamResponse, send: Send) -> None:
        async for chunk in response.body():
            last = response.finished  # the body's end is here already: say so with it
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})
            if last:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnect(receive: Receive) -> None:
    """Returns once the caller has gone."""
    while (await receive())["type"] != "http.disconnect":
        pass
