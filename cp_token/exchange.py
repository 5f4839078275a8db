"""RFC 8693 token exchange: the form of ``POST /oauth2/token`` -> what to ask the pipeline.

Pure functions over bytes and header values (no Starlette, no I/O), so every refusal is a
fast unit test. The parsed request goes through the very pipeline of ``GET /token``
(:mod:`cp_token.decision`); only the door differs.

Rules (SPEC "Token exchange"): no client authentication, unknown parameters ignored
(RFC 6749 §3.2), empty parameters count as omitted and single-valued ones must not repeat
(RFC 6749 §3.1), ``audience``/``resource`` may repeat and are checked against an allow-list
(``invalid_target``), ``scope`` likewise (``invalid_scope``, ``jwt`` minter only).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from cp_token.credential import check_credential
from cp_token.decision import ACCESS_TOKEN_TYPE, TokenAsk
from cp_token.errors import (
    CPTokenError,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    UnsupportedGrantType,
)
from cp_token.minters import DEFAULT_OPTIONS, MintOptions

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "GRANT_TYPE",
    "JWT_TOKEN_TYPE",
    "MAX_BODY_BYTES",
    "ExchangeRules",
    "authorization_server_metadata",
    "check_content_type",
    "parse_exchange",
    "parse_form",
]

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
FORM_TYPE = "application/x-www-form-urlencoded"
MAX_BODY_BYTES = 64 * 1024
# A token exchange has about six fields (audience and resource may repeat); a form with more
# is refused before any is decoded (990 fields cost 17x a normal form).
MAX_FIELDS = 64

SINGLE_VALUED = (
    "grant_type",
    "subject_token",
    "subject_token_type",
    "requested_token_type",
    "scope",
    "actor_token",
    "actor_token_type",
)
_ENCODED_CONSTANTS = {
    encoded: value
    for value in (GRANT_TYPE, ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE)
    for encoded in (quote(value, safe=""), quote(value, safe="").replace("%3A", "%3a"), value)
}
TARGETS = ("audience", "resource")  # RFC 8707: a resource counts as an audience here
# RFC 6749 §3.3 scope-token: %x21 / %x23-5B / %x5D-7E
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")


@dataclass(frozen=True)
class ExchangeRules:
    """What an exchange may ask for: the operator's allow-lists and the minter's abilities.

    ``per_request``: the minter issues per-request ``aud``, a ``scope`` claim and JWTs (the
    ``jwt`` minter); the others hand out one token unchanged.
    """

    audiences: tuple[str, ...]
    scopes: tuple[str, ...] = ()
    per_request: bool = False


def check_content_type(value: str | None) -> None:
    """Only ``application/x-www-form-urlencoded`` (parameters such as ``charset`` allowed)."""
    media = (value or "").partition(";")[0].strip().lower()
    if media != FORM_TYPE:
        shown = media[:80] or "none"
        raise InvalidRequest(
            f"Content-Type must be {FORM_TYPE} (got {shown})", reason="content_type"
        )


def _unescape(raw: str) -> str:
    """One form-encoded name or value, decoded (``+`` is a space, ``%XX`` UTF-8 bytes)."""
    known = _ENCODED_CONSTANTS.get(raw)
    if known is not None:  # the grant's URNs: skip percent-decoding them on every request
        return known
    if "+" in raw:
        raw = raw.replace("+", " ")
    return unquote(raw, errors="strict") if "%" in raw else raw


def parse_form(body: bytes) -> dict[str, list[str]]:
    """Decode a form body (UTF-8, RFC 6749 Appendix B); empty values are dropped (§3.1).
    More than :data:`MAX_FIELDS` fields is refused before any is decoded.

    The same decoding as :func:`urllib.parse.parse_qsl` (``&`` separates, ``+`` is a space),
    at a fraction of its cost for the bodies this endpoint sees.
    """
    if body.count(b"&") >= MAX_FIELDS:
        raise InvalidRequest(
            f"the form has more than {MAX_FIELDS} fields", reason="too_many_fields"
        )
    try:
        text = body.decode("ascii")  # a form body is ASCII: everything else is %-encoded
        form: dict[str, list[str]] = {}
        for field in text.split("&"):
            if not field:
                continue
            name, _, value = field.partition("=")
            name, value = _unescape(name), _unescape(value)
            if value:
                form.setdefault(name, []).append(value)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest(
            "the body is not a UTF-8 form (application/x-www-form-urlencoded)",
            reason="malformed_form",
        ) from None
    return form


def _single(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def _check_listed(
    values: Sequence[str], allowed: tuple[str, ...], what: str, error: type[CPTokenError]
) -> None:
    """Every value allowed, else ``error`` naming the value's position: never the value (a
    caller may have pasted a token into the wrong field), nor the allow-list (the operator's
    configuration is not the caller's business)."""
    for i, value in enumerate(values, 1):
        if value not in allowed:
            raise error(f"{what} value #{i} is not allowed here", reason=f"{what}_not_allowed")


def parse_exchange(form: dict[str, list[str]], rules: ExchangeRules) -> TokenAsk:
    """Validate a token-exchange form; the subject token and what to mint, or an error type.

    The order is fixed: repeated parameters, ``grant_type``, ``actor_token``, the subject
    token and its type, ``requested_token_type``, audiences, scopes. No parameter value is
    ever echoed when it could be a token.
    """
    repeated = [name for name in SINGLE_VALUED if len(form.get(name, ())) > 1]
    if repeated:
        raise InvalidRequest(f"parameter {repeated[0]} must not repeat", reason="repeated_param")
    grant_type = _single(form, "grant_type")
    if grant_type is None:
        raise InvalidRequest("missing grant_type", reason="missing_param")
    if grant_type != GRANT_TYPE:
        raise UnsupportedGrantType(
            f"grant_type must be {GRANT_TYPE}", reason="unsupported_grant_type"
        )
    if "actor_token" in form or "actor_token_type" in form:
        raise InvalidRequest("actor_token is not supported (no delegation)", reason="actor_token")
    subject = _single(form, "subject_token")
    if subject is None:
        raise InvalidRequest("missing subject_token", reason="missing_param")
    subject_type = _single(form, "subject_token_type")
    if subject_type is None:
        raise InvalidRequest("missing subject_token_type", reason="missing_param")
    if subject_type != JWT_TOKEN_TYPE:
        raise InvalidRequest(
            f"subject_token_type must be {JWT_TOKEN_TYPE} (a ServiceAccount token)",
            reason="subject_token_type",
        )
    requested = _single(form, "requested_token_type") or ACCESS_TOKEN_TYPE
    if requested not in (ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE) or (
        requested == JWT_TOKEN_TYPE and not rules.per_request
    ):
        kinds = ACCESS_TOKEN_TYPE + (f" or {JWT_TOKEN_TYPE}" if rules.per_request else "")
        raise InvalidRequest(f"requested_token_type must be {kinds}", reason="requested_token_type")
    targets = tuple(dict.fromkeys(v for name in TARGETS for v in form.get(name, ())))
    _check_listed(targets, rules.audiences, "audience", InvalidTarget)
    scopes = tuple(dict.fromkeys((_single(form, "scope") or "").split()))
    if scopes and not rules.per_request:
        raise InvalidScope(
            "this CP's minter cannot narrow scopes (only the jwt minter can)",
            reason="scope_not_supported",
        )
    bad = [s for s in scopes if not _SCOPE_TOKEN.match(s)]
    if bad:
        raise InvalidScope("scope is not a space-separated list of scope tokens", reason="scope")
    _check_listed(scopes, rules.scopes, "scope", InvalidScope)
    # Only a minter that narrows gets options: the others return their token unchanged.
    options = DEFAULT_OPTIONS
    if rules.per_request and (targets or scopes):
        options = MintOptions(audiences=targets or None, scopes=scopes)
    return TokenAsk(credential=check_credential(subject), options=options, token_type=requested)


def authorization_server_metadata(
    *,
    issuer: str,
    token_endpoint: str,
    jwks_uri: str | None,
    scopes: tuple[str, ...] = (),
) -> dict[str, Any]:
    """RFC 8414 metadata: a token endpoint for the token-exchange grant, no client auth."""
    meta: dict[str, Any] = {
        "issuer": issuer,
        "token_endpoint": token_endpoint,
        "grant_types_supported": [GRANT_TYPE],
        "token_endpoint_auth_methods_supported": ["none"],
        # no authorization endpoint: nothing is ever issued by a redirect
        "response_types_supported": [],
    }
    if jwks_uri is not None:
        meta["jwks_uri"] = jwks_uri
    if scopes:
        meta["scopes_supported"] = list(scopes)
    return meta
