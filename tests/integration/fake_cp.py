"""A small fake CP token service on loopback, answering ``/token`` exactly like the real one.

The JSON and headers mirror ``cp_token.app`` (200 body, 401/403/429/503 error documents,
``Cache-Control: no-store``, ``Retry-After`` in whole seconds, 405 with ``Allow: GET``), so the
sidecar and client tests exercise the same contract the real service serves. It runs on
``tests.fakes.servers.LoopbackServer``: ``stop()``/``start()`` keep the port, so a test can take
the CP down (connections refused) and bring it back.
"""

from __future__ import annotations

import itertools
import json
import math
import secrets
import threading
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.servers import LoopbackServer

__all__ = ["FakeCP"]

NO_STORE = {"Cache-Control": "no-store"}


def _rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.floor(ts)))


def _error(status: int, error: str, description: str, **headers: str) -> Response:
    body = json.dumps({"error": error, "error_description": description}).encode()
    return Response(
        body, status_code=status, media_type="application/json", headers={**NO_STORE, **headers}
    )


class FakeCP:
    """``/token`` that mints ``ttl``-second opaque tokens for callers bearing ``sa_token``.

    ``mode`` switches the answer: ``ok``, ``unavailable`` (503 + Retry-After),
    ``rate_limited`` (429 + Retry-After), ``unauthorized`` (401), ``forbidden`` (403).
    ``issued`` maps every token handed out to its wall-clock expiry.
    """

    def __init__(self, *, ttl: int = 900, sa_token: str = "sa-token", tls: bool = False) -> None:
        self.ttl = ttl
        self.sa_token = sa_token
        self.mode = "ok"
        self.retry_after = 1
        self.description = "system:serviceaccount:ns:default is not a session runner"
        self.issued: dict[str, float] = {}
        self.calls = 0
        self._serial = itertools.count(1)
        self._prefix = secrets.token_hex(4)
        self._lock = threading.Lock()
        app = Starlette(routes=[Route("/token", self._token, methods=["GET", "POST", "PUT"])])
        self.server = LoopbackServer(app, tls=tls, name="fake-cp")

    @property
    def url(self) -> str:
        """The ``/token`` URL."""
        return f"{self.server.url}/token"

    def expiry(self, token: str) -> float:
        """Wall-clock expiry of a token this fake issued."""
        with self._lock:
            return self.issued[token]

    async def _token(self, request: Request) -> Response:
        with self._lock:
            self.calls += 1
        if request.method != "GET":
            return _error(
                405, "method_not_allowed", f"{request.method} is not allowed", Allow="GET"
            )
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or credential.strip() != self.sa_token:
            return _error(
                401,
                "invalid_token",
                "the ServiceAccount token is not valid",
                **{"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        mode = self.mode
        if mode == "unavailable":
            return _error(
                503,
                "temporarily_unavailable",
                "the Kubernetes API is unreachable",
                **{"Retry-After": str(self.retry_after)},
            )
        if mode == "rate_limited":
            return _error(
                429, "rate_limited", "too many requests", **{"Retry-After": str(self.retry_after)}
            )
        if mode == "unauthorized":
            return _error(401, "invalid_token", self.description)
        if mode == "forbidden":
            return _error(403, "access_denied", self.description)
        token = f"cp-{self._prefix}-{next(self._serial)}"
        expires_at = time.time() + self.ttl
        with self._lock:
            self.issued[token] = expires_at
        body = {
            "token": token,
            "token_type": "Bearer",
            "expires_at": _rfc3339(expires_at),
            "expires_in": self.ttl,
        }
        return Response(
            json.dumps(body, separators=(",", ":")).encode(),
            media_type="application/json",
            headers=NO_STORE,
        )

    def __enter__(self) -> FakeCP:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.close()
