"""Refuse what cannot be a ServiceAccount token before it costs the API server anything.

Only unverified structure is looked at here (three base64url parts, JSON header and claims,
``exp`` not in the past, ``aud`` inside the accepted audiences); the signature is the API
server's business (or the ``jwks`` authenticator's).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from cp_token.errors import Unauthenticated

__all__ = ["UnverifiedJWT", "decode_unverified", "precheck"]

_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_TOKEN_BYTES = 16 * 1024
LEEWAY = 30.0


@dataclass(frozen=True)
class UnverifiedJWT:
    """Header and claims of a JWT whose signature has not been checked."""

    header: dict[str, Any]
    claims: dict[str, Any]

    @property
    def exp(self) -> float | None:
        """The ``exp`` claim, if numeric."""
        exp = self.claims.get("exp")
        return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None

    @property
    def audiences(self) -> tuple[str, ...] | None:
        """The ``aud`` claim as a tuple (None when absent, as in legacy tokens)."""
        aud = self.claims.get("aud")
        if aud is None:
            return None
        if isinstance(aud, str):
            return (aud,)
        if isinstance(aud, list):
            return tuple(a for a in aud if isinstance(a, str))
        return ()


def _b64json(part: str, what: str) -> dict[str, Any]:
    if not _B64URL.match(part):
        raise Unauthenticated(f"malformed token: {what} is not base64url", reason="malformed")
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise Unauthenticated(f"malformed token: {what} is not JSON", reason="malformed") from None
    if not isinstance(value, dict):
        raise Unauthenticated(f"malformed token: {what} is not an object", reason="malformed")
    return value


def decode_unverified(token: str) -> UnverifiedJWT:
    """Split and decode a compact JWS without verifying it; raises Unauthenticated."""
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated("malformed token: too long", reason="malformed")
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise Unauthenticated("malformed token: not a JWT", reason="malformed")
    header = _b64json(parts[0], "header")
    claims = _b64json(parts[1], "payload")
    if not _B64URL.match(parts[2]):
        raise Unauthenticated("malformed token: signature is not base64url", reason="malformed")
    return UnverifiedJWT(header=header, claims=claims)


def precheck(token: str, audiences: tuple[str, ...], now: float) -> UnverifiedJWT:
    """Reject non-JWTs, expired tokens and tokens made for another audience."""
    jwt = decode_unverified(token)
    exp = jwt.exp
    if "exp" in jwt.claims and exp is None:
        raise Unauthenticated("malformed token: exp is not a number", reason="malformed")
    if exp is not None and exp + LEEWAY < now:
        raise Unauthenticated("token has expired", reason="expired")
    aud = jwt.audiences
    if aud is not None and not set(aud) & set(audiences):
        raise Unauthenticated(
            "token was not issued for this service's audience "
            f"(expected one of: {', '.join(audiences)})",
            reason="wrong_audience",
        )
    return jwt
