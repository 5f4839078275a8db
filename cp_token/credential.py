"""The presented credential's outer shape, checked the same way behind every door.

``GET /token`` takes it from ``Authorization: Bearer``, ``POST /oauth2/token`` from the
``subject_token`` form field; both go through :func:`check_credential` before anything else
looks at them. Length is checked first, so an oversized token is refused without being
parsed (no regex, no base64, no JSON).
"""

from __future__ import annotations

import re

from cp_token.authn.precheck import MAX_TOKEN_BYTES
from cp_token.errors import Unauthenticated

__all__ = ["MAX_TOKEN_BYTES", "check_credential", "parse_bearer"]

# RFC 6750 §2.1 b64token
_B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
# "Bearer" and the whitespace around the token; a longer header cannot hold an allowed token
_HEADER_SLACK = 64


def _too_long() -> Unauthenticated:
    return Unauthenticated(f"token too long (over {MAX_TOKEN_BYTES} bytes)", reason="too_long")


def check_credential(token: str) -> str:
    """``token`` if it can be a token at all (length, then non-empty, then b64token)."""
    if len(token) > MAX_TOKEN_BYTES:
        raise _too_long()
    if not token:
        raise Unauthenticated("empty bearer token", reason="empty")
    if not _B64TOKEN.match(token):
        raise Unauthenticated("malformed bearer token", reason="malformed")
    return token


def parse_bearer(header: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header (scheme case-insensitive)."""
    if header is None:
        raise Unauthenticated("missing Authorization: Bearer credentials", missing=True)
    if len(header) > MAX_TOKEN_BYTES + _HEADER_SLACK:
        raise _too_long()
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthenticated("the Authorization scheme must be Bearer", missing=True)
    return check_credential(rest.strip())
