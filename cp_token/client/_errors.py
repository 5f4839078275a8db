"""The client's errors: one base, and the two outcomes a caller must tell apart.

Messages name the URL and the reason, never a token.
"""

from __future__ import annotations

__all__ = ["TokenError", "TokenRejected", "TokenUnavailable"]


class TokenError(Exception):
    """Base of every client failure (also: misconfiguration, a missing SA token file)."""


class TokenRejected(TokenError):
    """The server refused this caller (401/403): retrying will not help.

    ``status`` is the HTTP status and ``description`` the server's ``error_description``.
    """

    def __init__(self, status: int, description: str, url: str) -> None:
        super().__init__(f"{url} refused the token request ({status}): {description}")
        self.status = status
        self.description = description
        self.url = url


class TokenUnavailable(TokenError):
    """A transient failure (connect error, timeout, 429, 5xx, malformed answer).

    Raised by the retrying calls once the failures outlast the deadline, and by the
    single-attempt calls (:meth:`TokenSource.fetch_once`) at once. ``retry_after`` is the
    server's ``Retry-After`` in seconds when it sent one.
    """

    def __init__(self, message: str, url: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.retry_after = retry_after
