"""A raw ASGI router for the sidecar's handful of routes, and its lifespan.

The sidecar serves four fixed paths; a framework's routing, middleware and request objects
cost per-pod memory (every session pod runs one) and time on the hot path, and buy nothing
here. This module is the whole "framework": exact-path dispatch, 404 for anything else,
GET/HEAD-only plain-text endpoints, and the ASGI lifespan protocol around an async context
manager.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from typing import Any

__all__ = [
    "TEXT",
    "ASGIApp",
    "Lifespan",
    "Message",
    "Receive",
    "Router",
    "Scope",
    "Send",
    "plain_endpoint",
    "send_response",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Lifespan = Callable[[], contextlib.AbstractAsyncContextManager[None]]

log = logging.getLogger("sidecar.asgi")

TEXT = b"text/plain; charset=utf-8"


async def send_response(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = TEXT,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send a complete response with ``Content-Type`` and ``Content-Length``."""
    head = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if headers:
        head.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def plain_endpoint(handler: Callable[[], tuple[int, bytes, bytes]]) -> ASGIApp:
    """An ASGI app for GET/HEAD answering ``handler()`` = ``(status, body, content_type)``;
    other methods get 405 with ``Allow: GET, HEAD``."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await send_response(
                send, 405, b"Method Not Allowed", headers=[(b"allow", b"GET, HEAD")]
            )
            return
        status, body, content_type = handler()
        if method == "HEAD":
            head = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": head})
            await send({"type": "http.response.body", "body": b""})
            return
        await send_response(send, status, body, content_type)

    return endpoint


class Router:
    """Dispatches HTTP requests by exact path, then by path prefix (``prefixes``, e.g. the
    sealed sidecar's ``/upstream/``); runs ``lifespan`` for the server's lifespan."""

    def __init__(
        self,
        routes: Mapping[str, ASGIApp],
        lifespan: Lifespan | None = None,
        prefixes: Mapping[str, ASGIApp] | None = None,
    ) -> None:
        self._routes = dict(routes)
        self._lifespan = lifespan
        self._prefixes = tuple((prefixes or {}).items())

    @contextlib.asynccontextmanager
    async def lifespan_context(self) -> AsyncIterator[None]:
        """The app's lifespan as a context manager (what the server runs around serving)."""
        if self._lifespan is None:
            yield
            return
        async with self._lifespan():
            yield

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            route = self._routes.get(path)
            if route is None:
                route = next((app for p, app in self._prefixes if path.startswith(p)), None)
            if route is None:
                await send_response(send, 404, b"Not Found")
                return
            await route(scope, receive, send)
        elif kind == "lifespan":
            await self._run_lifespan(receive, send)

    async def _run_lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        context = self.lifespan_context()
        try:
            await context.__aenter__()
        except BaseException as exc:
            log.exception("startup failed")
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            raise
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await context.__aexit__(None, None, None)
        except BaseException as exc:
            log.exception("shutdown failed")
            await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
            raise
        await send({"type": "lifespan.shutdown.complete"})
