"""Refuse what cannot be a ServiceAccount token before it costs the API server anything.

Only unverified structure is looked at here (three base64url parts, UTF-8 JSON header and
claims, ``alg`` a string, time claims that are sane numbers, ``exp`` not in the past, ``nbf``
and ``iat`` not in the future, ``aud`` inside the accepted audiences); the signature is
checked against the API server's issuer keys elsewhere (:mod:`cp_token.authn.issuer_keys`).

Whatever the input, this module raises nothing but :class:`Unauthenticated`: a token is
attacker-controlled bytes, so nesting depth, number sizes and value types are all bounded
before anything relies on them.
"""

from __future__ import annotations

import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from cp_token.errors import Unauthenticated

__all__ = [
    "EXP_LEEWAY",
    "MAX_TOKEN_BYTES",
    "UnverifiedJWT",
    "b64url_bytes",
    "decode_unverified",
    "numeric_date",
    "precheck",
    "string_claim",
]

_B64URL = re.compile(r"[A-Za-z0-9_-]+")
MAX_TOKEN_BYTES = 16 * 1024  # SPEC: a bearer token over 16 KiB is refused unparsed
# For `exp`: kube-apiserver accepts a ServiceAccount token up to 60 s past its exp
# (k8s.io/kubernetes pkg/serviceaccount/claims.go: go-jose's Claims.Validate applies
# jwt.DefaultLeeway, 1 minute); a token it would still accept is not refused here either.
EXP_LEEWAY = 60.0
LEEWAY = EXP_LEEWAY
FUTURE_LEEWAY = 60.0  # for `nbf`/`iat`: the API server's own clock-skew allowance
MAX_CONTAINERS = 64  # a ServiceAccount token's header and claims hold about 8 objects/arrays
MAX_NUMERIC_DATE = 2.0**53  # exact in a float, far past any real date, far from overflow


def _malformed(what: str) -> Unauthenticated:
    return Unauthenticated(f"malformed token: {what}", reason="malformed")


def _too_many_containers(text: str) -> bool:
    """True when JSON ``text`` holds more objects/arrays than a ServiceAccount token could.

    Two C-speed counts bound the nesting depth (depth <= number of containers) before
    ``json.loads`` recurses, so a 16 KiB ``[[[[...`` costs microseconds and never reaches
    the recursion limit. Brackets inside strings count too: a real token has none to speak of.
    """
    return text.count("[") + text.count("{") > MAX_CONTAINERS


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Python's json extensions


_JSON = json.JSONDecoder(parse_constant=_no_constants)  # one decoder, not one per call
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def b64url_bytes(text: str) -> bytes:
    """Decode unpadded base64url (RFC 7515 §2); ValueError (``binascii.Error`` is one) for
    anything else: another character (``+``, ``/``, ``=``, whitespace, non-ASCII), a length
    no encoding has, or nothing at all."""
    if not text or "+" in text or "/" in text or "=" in text:
        raise ValueError("not base64url")
    # strict: any character outside the (translated) alphabet is an error, not skipped
    padded = text.encode("ascii").translate(_FROM_URLSAFE) + b"=" * (-len(text) % 4)
    return binascii.a2b_base64(padded, strict_mode=True)


def _b64json(part: str, what: str) -> dict[str, Any]:
    try:
        raw = b64url_bytes(part)
    except ValueError:
        raise _malformed(f"{what} is not base64url") from None
    try:
        text = raw.decode("utf-8")  # RFC 7515: UTF-8, never UTF-16/32 that json would sniff
    except ValueError:
        raise _malformed(f"{what} is not base64url-encoded UTF-8") from None
    if _too_many_containers(text):
        raise _malformed(f"{what} nests too many values")
    try:
        value = _JSON.decode(text)
    except (ValueError, RecursionError):
        raise _malformed(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise _malformed(f"{what} is not an object")
    return value


def numeric_date(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 §2) as a float; None when absent.

    Raises Unauthenticated for anything else: a bool, a string, a list, NaN, or a number so
    large that ``float()`` would overflow or the date is meaningless.
    """
    value = claims.get(name)
    if value is None:
        return None
    if type(value) is int and -MAX_NUMERIC_DATE <= value <= MAX_NUMERIC_DATE:
        return float(value)  # what a real token holds: the one check that matters
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _malformed(f"{name} is not a number")
    if isinstance(value, int) and abs(value) > MAX_NUMERIC_DATE:
        raise _malformed(f"{name} is out of range")
    number = float(value)
    if not math.isfinite(number) or abs(number) > MAX_NUMERIC_DATE:
        raise _malformed(f"{name} is out of range")
    return number


def string_claim(mapping: dict[str, Any], name: str) -> str | None:
    """A claim or header parameter that must be a string when present; None when absent."""
    value = mapping.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _malformed(f"{name} is not a string")
    return value


@dataclass(frozen=True)
class UnverifiedJWT:
    """Header and claims of a JWT whose signature has not been checked."""

    header: dict[str, Any]
    claims: dict[str, Any]

    @property
    def alg(self) -> str:
        """The header's ``alg`` (decode_unverified made sure it is a string)."""
        return str(self.header["alg"])

    @property
    def kid(self) -> str | None:
        """The header's ``kid`` (a string when present, checked at decode time)."""
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) else None

    @property
    def exp(self) -> float | None:
        """The ``exp`` claim, if it is a sane number (precheck refuses any other value)."""
        try:
            return numeric_date(self.claims, "exp")
        except Unauthenticated:
            return None

    @property
    def subject(self) -> str | None:
        """The unverified ``sub`` claim, if it is a string (used only to share capacity)."""
        sub = self.claims.get("sub")
        return sub if isinstance(sub, str) else None

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


def decode_unverified(token: str) -> UnverifiedJWT:
    """Split and decode a compact JWS without verifying it; raises Unauthenticated only."""
    if len(token) > MAX_TOKEN_BYTES:
        raise _malformed("too long")
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise _malformed("not a JWT")
    header = _b64json(parts[0], "header")
    claims = _b64json(parts[1], "payload")
    if not _B64URL.fullmatch(parts[2]):
        raise _malformed("signature is not base64url")
    if not isinstance(header.get("alg"), str):
        raise _malformed("alg is not a string")
    string_claim(header, "kid")
    return UnverifiedJWT(header=header, claims=claims)


def precheck(token: str, audiences: tuple[str, ...], now: float) -> UnverifiedJWT:
    """Reject non-JWTs, malformed time claims, expired or not-yet-valid tokens, and tokens
    made for another audience."""
    jwt = decode_unverified(token)
    exp = numeric_date(jwt.claims, "exp")
    nbf = numeric_date(jwt.claims, "nbf")
    iat = numeric_date(jwt.claims, "iat")
    if exp is not None and exp + LEEWAY < now:
        raise Unauthenticated("token has expired", reason="expired")
    if nbf is not None and nbf - FUTURE_LEEWAY > now:
        raise Unauthenticated("token is not valid yet", reason="not_yet_valid")
    if iat is not None and iat - FUTURE_LEEWAY > now:
        raise Unauthenticated("token was issued in the future", reason="not_yet_valid")
    aud = jwt.audiences
    if aud is not None and not set(aud) & set(audiences):
        raise Unauthenticated(
            "token was not issued for this service's audience "
            f"(expected one of: {', '.join(audiences)})",
            reason="wrong_audience",
        )
    return jwt
