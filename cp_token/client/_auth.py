"""TokenAuth: an ``httpx.Auth`` that adds the bearer and retries once on a 401.

Getting a token is I/O, so this overrides ``sync_auth_flow`` and ``async_auth_flow`` (httpx's
hooks for flows that do I/O) rather than the plain ``auth_flow``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

import httpx

from ._source import TokenSource

__all__ = ["TokenAuth"]


class TokenAuth(httpx.Auth):
    """Adds ``Authorization: Bearer <token>`` from a :class:`TokenSource`.

    On a 401 from the API, the token is invalidated and the request is sent once more with a
    fresh token, unless the source hands back the same token (a static one, or a sidecar
    that fetched moments ago): a second 401 is returned to the caller as is.
    """

    # The body is buffered so that the retry can send it again.
    requires_request_body = True

    def __init__(self, source: TokenSource) -> None:
        self.source = source

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        """The flow for ``httpx.Client``."""
        request.read()
        token = self.source.token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        self.source.invalidate(token)
        fresh = self.source.token()
        if fresh != token:
            request.headers["Authorization"] = f"Bearer {fresh}"
            yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """The flow for ``httpx.AsyncClient``."""
        await request.aread()
        token = await self.source.atoken()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        self.source.invalidate(token)
        fresh = await self.source.atoken()
        if fresh != token:
            request.headers["Authorization"] = f"Bearer {fresh}"
            yield request
