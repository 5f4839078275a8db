"""Errors as types, mapped to HTTP in one place (:func:`error_response`).

Every refusal the CP service makes is one of these; routes raise, the app's exception
handler turns them into the RFC 6750 / RFC 6749 shaped JSON of SPEC.md. Descriptions never
contain a token.
"""

from __future__ import annotations

import math

from starlette.responses import JSONResponse

__all__ = [
    "CPTokenError",
    "Forbidden",
    "MethodNotAllowed",
    "RateLimited",
    "Unauthenticated",
    "Unavailable",
    "error_response",
]

NO_STORE = {"Cache-Control": "no-store"}


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
        """Whole seconds, at least 1."""
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
        """Whole seconds, at least 1."""
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class MethodNotAllowed(CPTokenError):
    """405 for anything but GET on a GET-only route."""

    status = 405
    error = "method_not_allowed"

    def headers(self) -> dict[str, str]:
        """RFC 9110: list the allowed methods."""
        return {"Allow": "GET"}


def error_response(exc: CPTokenError) -> JSONResponse:
    """The one mapping from error type to HTTP response."""
    headers = {**NO_STORE, **exc.headers()}
    body = {"error": exc.error, "error_description": exc.description}
    return JSONResponse(body, status_code=exc.status, headers=headers)
