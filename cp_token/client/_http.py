"""One HTTP exchange with a token endpoint: how to ask, and what the answer means.

The three places a token can come from (the pod's sidecar, the CP directly, a static dev
token) differ only in how the request is made; the answer is the CP's JSON in every case,
and its status decides between a token, :class:`TokenRejected` (401/403, never retried),
:class:`TokenUnavailable` (connect errors, timeouts, 429, 5xx, a malformed 200: retried)
and a plain :class:`TokenError` (anything else, e.g. a redirect we refuse to follow).
"""

from __future__ import annotations

import hashlib
import math
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from cp_token.runtime.clock import rfc3339

from ._errors import TokenError, TokenRejected, TokenUnavailable
from ._retry import parse_retry_after

if TYPE_CHECKING:  # imported where used: the sidecar reads answers without httpx (memory)
    import httpx

__all__ = [
    "SIDECAR_HEADER",
    "Answer",
    "FetchedToken",
    "ServiceAccountTokenFile",
    "client_options",
    "parse_token_response",
    "read_sa_token",
    "rfc3339",
    "transport_error",
    "untrusted_certificate",
]

SIDECAR_HEADER = "Ambient-Token-Request"
_MAX_DESCRIPTION = 300


@dataclass(frozen=True)
class FetchedToken:
    """A token as received: its lifetime is tracked on the monotonic clock.

    ``expires_in`` is the lifetime the server stated (None for an opaque token of unknown
    expiry), ``expires_at`` the server's RFC 3339 expiry (passed through, for display), and
    ``fetched_at`` the monotonic time the request was *sent*, so the tracked expiry errs
    early, never late. The token itself is left out of ``repr``.
    """

    token: str = field(repr=False)
    expires_in: int | None
    expires_at: str | None
    fetched_at: float

    @property
    def expiry(self) -> float | None:
        """Monotonic time of expiry, None when unknown."""
        return None if self.expires_in is None else self.fetched_at + self.expires_in

    def remaining(self, now: float) -> float | None:
        """Seconds of lifetime left at monotonic ``now`` (negative once expired)."""
        expiry = self.expiry
        return None if expiry is None else expiry - now

    def valid_at(self, now: float) -> bool:
        """True while unexpired (a token of unknown expiry is always valid)."""
        expiry = self.expiry
        return expiry is None or now < expiry


def client_options(ca_file: str | None, timeout: float, *, tls: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``httpx.Client``/``AsyncClient`` towards a token endpoint.

    Proxy variables are ignored (``trust_env=False``: the SA token never travels through a
    proxy), redirects are not followed (the credential goes to the configured URL only),
    and the pool is small: a source makes one request at a time. Without ``tls`` (an
    ``http://`` endpoint) the CA store is not loaded (about a MiB per process); the context
    then still verifies but trusts nothing, so no TLS connection could succeed anyway.
    """
    import httpx

    if tls:
        context = ssl.create_default_context(cafile=ca_file)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return {
        "trust_env": False,
        "verify": context,
        "timeout": httpx.Timeout(timeout),
        "limits": httpx.Limits(max_connections=4, max_keepalive_connections=2),
        "follow_redirects": False,
    }


def read_sa_token(path: str) -> str:
    """The pod's projected ServiceAccount token, read afresh (kubelet rotates it)."""
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise TokenError(
            f"cannot read the ServiceAccount token file {path!r} ({exc.strerror or exc}); "
            "mount a projected ServiceAccount token there (a 'projected' volume with a "
            "'serviceAccountToken' source for the CP audience, e.g. 'ambient-cp', "
            "expirationSeconds >= 600) or point AMBIENT_SA_TOKEN_FILE at it"
        ) from None
    if not token:
        raise TokenError(f"the ServiceAccount token file {path!r} is empty")
    return token


class ServiceAccountTokenFile:
    """``AMBIENT_SA_TOKEN_FILE``, read afresh for every request, remembering (a digest of,
    never the token itself) what was last sent, so a refused pod can tell when kubelet has
    put another token there."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sent: bytes | None = None

    def read_for_sending(self) -> str:
        """The current token, remembered as the one sent."""
        token = read_sa_token(self.path)
        self._sent = hashlib.sha256(token.encode()).digest()
        return token

    def changed(self) -> bool:
        """Whether the file now holds another token than the one last sent (False when
        nothing was sent yet or the file cannot be read). A small local read: cheap enough
        to poll while the CP refuses the last one."""
        if self._sent is None:
            return False
        try:
            token = read_sa_token(self.path)
        except TokenError:
            return False
        return hashlib.sha256(token.encode()).digest() != self._sent


def _cert_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def untrusted_certificate(url: str, bad_cert: ssl.SSLCertVerificationError) -> TokenError:
    """The error for a server certificate that does not verify (never retried)."""
    return TokenError(
        f"{url}: the server's TLS certificate does not verify "
        f"({bad_cert.verify_message or bad_cert}); set AMBIENT_CP_CA_FILE to its CA bundle"
    )


def transport_error(exc: httpx.HTTPError, url: str) -> TokenError:
    """Map an httpx failure to the client's errors (transport trouble is transient, except
    a certificate that does not verify: retrying cannot fix the trust configuration)."""
    import httpx

    bad_cert = _cert_failure(exc)
    if bad_cert is not None:
        return untrusted_certificate(url, bad_cert)
    if isinstance(exc, httpx.TimeoutException):
        return TokenUnavailable(f"{url}: timed out ({type(exc).__name__})", url)
    if isinstance(exc, httpx.TransportError):
        detail = str(exc) or type(exc).__name__
        return TokenUnavailable(f"{url}: {detail}", url)
    return TokenError(f"{url}: {type(exc).__name__}: {exc}")


class Answer(Protocol):
    """What is read of a token endpoint's HTTP answer (an ``httpx.Response`` is one)."""

    @property
    def status_code(self) -> int:
        """The HTTP status."""

    @property
    def reason_phrase(self) -> str:
        """The status line's reason."""

    @property
    def headers(self) -> Mapping[str, str]:
        """Response headers; ``get`` is case-insensitive."""

    def json(self) -> Any:
        """The body parsed as JSON; raises ValueError."""


def _error_fields(response: Answer) -> tuple[str | None, str]:
    """The RFC 6749 ``error`` and ``error_description`` of a refusal, if it has them."""
    error: str | None = None
    description = response.reason_phrase or f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        return error, description
    if isinstance(body, dict):
        if isinstance(body.get("error"), str):
            error = body["error"]
        if isinstance(body.get("error_description"), str) and body["error_description"]:
            description = body["error_description"]
    return error, description[:_MAX_DESCRIPTION]


def _lifetime(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expires_in is not a number")
    if not math.isfinite(value) or value < 0:
        raise ValueError("expires_in is negative or not finite")
    return int(value)


def parse_token_response(
    response: Answer, url: str, *, fetched_at: float, wall_now: float
) -> FetchedToken:
    """Turn a token endpoint's answer into a :class:`FetchedToken` or raise."""
    status = response.status_code
    if status == 200:
        try:
            body = response.json()
            if not isinstance(body, dict):
                raise ValueError("not an object")
            token = body.get("token")
            if not isinstance(token, str) or not token:
                raise ValueError("no token")
            expires_in = _lifetime(body.get("expires_in"))
            expires_at = body.get("expires_at")
            if not isinstance(expires_at, str):
                expires_at = None if expires_in is None else rfc3339(wall_now + expires_in)
        except ValueError as exc:
            # The CP never answers 200 without a token: something in the path (an ingress,
            # a half-deployed server) misbehaves. Treated as transient, bounded by the deadline.
            raise TokenUnavailable(
                f"{url}: answered 200 without a token JSON body ({exc})", url
            ) from None
        return FetchedToken(token, expires_in, expires_at, fetched_at)
    error, description = _error_fields(response)
    if status in (401, 403):
        raise TokenRejected(status, description, url)
    if status == 429 or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"), wall_now)
        label = f"{error}: {description}" if error else description
        raise TokenUnavailable(f"{url}: HTTP {status} ({label})", url, retry_after=retry_after)
    if 300 <= status < 400:
        location = response.headers.get("Location", "?")
        raise TokenError(
            f"{url} redirected ({status}) to {location}; not followed: the credential is only "
            "sent to the configured URL (configure the final URL)"
        )
    raise TokenError(f"{url}: unexpected HTTP {status} ({description})")
