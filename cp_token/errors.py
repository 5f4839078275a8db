"""Errors as types, mapped to HTTP in one place per protocol.

Every refusal the CP service makes is one of these; the pipeline raises, and the door the
request came through renders it: :func:`error_response` for ``GET /token`` (RFC 6750),
:func:`exchange_error_response` for ``POST /oauth2/token`` (RFC 6749 §5.2, RFC 8693 §2.2.2).
Descriptions never contain a token.

A ``Retry-After`` handed to a caller carries jitter (SPEC "Riding out faults"): where the
wait would be N seconds, the values spread over N to 2N whole seconds, so the 300 pods told
to come back at once do not all come back in the same second. Both renderers take the random
source (``rand``, in ``[0, 1)``) so a test can fix it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from starlette.responses import JSONResponse

__all__ = [
    "CPTokenError",
    "Forbidden",
    "InternalError",
    "InvalidRequest",
    "InvalidScope",
    "InvalidTarget",
    "MethodNotAllowed",
    "PayloadTooLarge",
    "RateLimited",
    "Unauthenticated",
    "Unavailable",
    "UnsupportedGrantType",
    "error_response",
    "exchange_error_response",
    "spread_retry_after",
]

Random = Callable[[], float]

NO_STORE = {"Cache-Control": "no-store"}
# RFC 6749 §5.1: token endpoint answers are never cached, by HTTP/1.1 or HTTP/1.0 caches.
NO_STORE_EXCHANGE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class CPTokenError(Exception):
    """Base of every refusal; ``reason`` is a short machine word for logs and metrics."""

    status = 500
    error = "server_error"

    def __init__(self, description: str, *, reason: str | None = None) -> None:
        super().__init__(description)
        self.description = description
        self.reason = reason or self.error

    def headers(self) -> dict[str, str]:
        """Extra response headers for this error."""
        return {}

    @property
    def outcome(self) -> str:
        """The audit line's and the metric's ``outcome`` (the error code, by default)."""
        return self.error


class Unauthenticated(CPTokenError):
    """401: no Bearer credentials, or a token that is not authenticated."""

    status = 401
    error = "invalid_token"

    def __init__(
        self, description: str, *, reason: str | None = None, missing: bool = False
    ) -> None:
        super().__init__(description, reason=reason or ("missing" if missing else None))
        self.missing = missing

    def headers(self) -> dict[str, str]:
        """RFC 6750 §3.1: no error code when credentials were absent."""
        if self.missing:
            return {"WWW-Authenticate": "Bearer"}
        return {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class Forbidden(CPTokenError):
    """403: authenticated, but not an allowed session runner."""

    status = 403
    error = "access_denied"


class RateLimited(CPTokenError):
    """429: this identity's token bucket is empty."""

    status = 429
    error = "rate_limited"

    def __init__(self, description: str, *, retry_after: float) -> None:
        super().__init__(description, reason="rate_limited")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        """The wait in whole seconds, at least 1 (the renderers spread it over N to 2N)."""
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class Unavailable(CPTokenError):
    """503: a dependency (Kubernetes API, IdP) is failing and no cached answer serves."""

    status = 503
    error = "temporarily_unavailable"

    def __init__(
        self, description: str, *, reason: str | None = None, retry_after: float = 5.0
    ) -> None:
        super().__init__(description, reason=reason or "unavailable")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        """The wait in whole seconds, at least 1 (the renderers spread it over N to 2N)."""
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class InternalError(Unavailable):
    """503: an unexpected exception inside the pipeline (a bug), never answered as a 500.

    The client sees a retryable ``temporarily_unavailable``; the audit line and the metric
    say ``internal``, so operators can tell a bug from a dependency outage.
    """

    def __init__(self, description: str = "internal error; retry shortly") -> None:
        super().__init__(description, reason="internal", retry_after=5.0)

    @property
    def outcome(self) -> str:
        """``internal``, not ``temporarily_unavailable``."""
        return "internal"


class MethodNotAllowed(CPTokenError):
    """405 for a method the route does not serve."""

    status = 405
    error = "method_not_allowed"

    def __init__(self, description: str, *, allow: str = "GET") -> None:
        super().__init__(description)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        """RFC 9110: list the allowed methods."""
        return {"Allow": self.allow}


class InvalidRequest(CPTokenError):
    """400 (RFC 6749 §5.2): a token-exchange parameter is missing, repeated or invalid."""

    status = 400
    error = "invalid_request"


class InvalidTarget(CPTokenError):
    """400 (RFC 8693 §2.2.2): an ``audience``/``resource`` outside the allow-list."""

    status = 400
    error = "invalid_target"


class InvalidScope(CPTokenError):
    """400 (RFC 6749 §5.2): a ``scope`` outside the allow-list, or one the minter cannot set."""

    status = 400
    error = "invalid_scope"


class UnsupportedGrantType(CPTokenError):
    """400 (RFC 6749 §5.2): a ``grant_type`` other than token exchange."""

    status = 400
    error = "unsupported_grant_type"


class PayloadTooLarge(CPTokenError):
    """413: a request body over the limit; the connection is closed, the rest never read."""

    status = 413
    error = "invalid_request"

    def __init__(self, description: str) -> None:
        super().__init__(description, reason="body_too_large")

    def headers(self) -> dict[str, str]:
        """Close the connection so the server does not read the rest of the body."""
        return {"Connection": "close"}


def spread_retry_after(seconds: int, rand: Random = random.random) -> int:
    """A wait of ``seconds`` (at least 1) as handed to one caller: N to 2N whole seconds,
    each equally likely (``rand`` draws in ``[0, 1)``)."""
    base = max(1, seconds)
    return base + min(base, int(rand() * (base + 1)))


def _headers(exc: CPTokenError, base: dict[str, str], rand: Random) -> dict[str, str]:
    headers = {**base, **exc.headers()}
    wait = headers.get("Retry-After")
    if wait is not None:
        headers["Retry-After"] = str(spread_retry_after(int(wait), rand))
    return headers


def error_response(exc: CPTokenError, rand: Random = random.random) -> JSONResponse:
    """``GET /token``: the one mapping from error type to HTTP response (RFC 6750);
    ``Retry-After`` spread over N to 2N seconds by ``rand``."""
    headers = _headers(exc, NO_STORE, rand)
    body = {"error": exc.error, "error_description": exc.description}
    return JSONResponse(body, status_code=exc.status, headers=headers)


def exchange_error_response(exc: CPTokenError, rand: Random = random.random) -> JSONResponse:
    """``POST /oauth2/token``: the one mapping from error type to response (RFC 6749/8693).

    A subject token that is not authenticated or not allowed is the request's fault, so it
    is 400 ``invalid_request`` with the reason in ``error_description`` (RFC 8693 §2.2.2),
    never a 401 with ``WWW-Authenticate`` (there is no client authentication to retry).
    429, 503 and 405 keep their status and headers, as for ``GET /token`` (``Retry-After``
    spread the same way).
    """
    status, error, description = exc.status, exc.error, exc.description
    headers = _headers(exc, NO_STORE_EXCHANGE, rand)
    if isinstance(exc, Unauthenticated | Forbidden):
        status, error = 400, "invalid_request"
        verdict = "not authenticated" if isinstance(exc, Unauthenticated) else "not allowed"
        description = f"subject_token {verdict}: {description}"
        headers.pop("WWW-Authenticate", None)
    body = {"error": error, "error_description": description}
    return JSONResponse(body, status_code=status, headers=headers)
