"""One HTTP exchange with a token endpoint: how to ask, and what the answer means.

The three places a token can come from (the pod's sidecar, the CP directly, a static dev
token) differ only in how the request is made; the answer is the CP's JSON in every case,
and its status decides between a token, :class:`TokenRejected` (401/403, never retried),
:class:`TokenUnavailable` (connect errors, timeouts, 429, 5xx, a malformed 200: retried)
and a plain :class:`TokenError` (anything else, e.g. a redirect we refuse to follow).
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from cp_token.runtime.clock import rfc3339

from ._errors import TokenError, TokenRejected, TokenUnavailable
from ._retry import parse_retry_after

if TYPE_CHECKING:  # imported where used: the sidecar reads answers without httpx (memory)
    import httpx

__all__ = [
    "MAX_BODY",
    "MAX_DESCRIPTION",
    "MAX_LIFETIME",
    "MAX_TOKEN",
    "SIDECAR_HEADER",
    "Answer",
    "FetchedToken",
    "RawAnswer",
    "ServiceAccountTokenFile",
    "client_options",
    "decode_json",
    "lifetime",
    "parse_token_response",
    "printable",
    "read_sa_token",
    "rfc3339",
    "token_problem",
    "transport_error",
    "untrusted_certificate",
]

SIDECAR_HEADER = "Ambient-Token-Request"
# Bounds on what an upstream may answer (SPEC "Hostile input and overload": every answer
# from upstream is untrusted input too). Beyond them the answer is a bad one: transient.
MAX_BODY = 1024 * 1024  # a token answer is a few KiB
MAX_TOKEN = 16 * 1024  # the CP refuses bearer tokens over 16 KiB unparsed: none is longer
MAX_LIFETIME = 10 * 365 * 86400  # ten years; 1e308 s would be served as "year 9999"
MAX_DESCRIPTION = 300  # characters of upstream error text relayed, on every path
MAX_ERROR_CODE = 64
_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space: no CR, LF, NUL


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
    if isinstance(exc, httpx.ProtocolError):
        # h11's messages quote the offending bytes after a colon: keep what went wrong only
        what = str(exc).partition(":")[0].strip()
        return TokenUnavailable(f"{url}: malformed HTTP answer ({printable(what, 80)})", url)
    if isinstance(exc, httpx.TransportError):
        detail = printable(str(exc) or type(exc).__name__)
        return TokenUnavailable(f"{url}: {detail}", url)
    return TokenError(f"{url}: {type(exc).__name__}: {printable(str(exc))}")


class Answer(Protocol):
    """What is read of a token endpoint's HTTP answer: :class:`RawAnswer` (the client
    library reads httpx's answers into one, bounded; the sidecar builds one from what its own
    client read)."""

    @property
    def status_code(self) -> int:
        """The HTTP status."""

    @property
    def reason_phrase(self) -> str:
        """The status line's reason."""

    @property
    def headers(self) -> Mapping[str, str]:
        """Response headers, looked up by lower-case name."""

    @property
    def content(self) -> bytes:
        """The body, at most :data:`MAX_BODY` bytes."""


@dataclass(frozen=True)
class RawAnswer:
    """An HTTP answer as received: status, reason, headers (lower-case names, repeated
    ones joined with ``", "`` as httpx does) and the body."""

    status_code: int
    reason_phrase: str
    headers: Mapping[str, str]
    content: bytes = field(repr=False)

    @classmethod
    def from_parts(
        cls, status: int, reason: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> RawAnswer:
        """From an HTTP parser's pieces (bytes as received; names in any case)."""
        joined: dict[str, str] = {}
        for raw_name, raw_value in headers:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            joined[name] = f"{joined[name]}, {value}" if name in joined else value
        return cls(status, reason.decode("latin-1"), joined, body)


def printable(text: str, limit: int = MAX_DESCRIPTION) -> str:
    """Upstream text fit to relay: cut to ``limit`` characters, and every character that
    is not printable (line breaks, NUL, a lone surrogate, bidi controls) replaced by
    ``?``, so a message stays one line and encodes anywhere."""
    cut = text[:limit]
    if cut.isprintable():
        return cut
    return "".join(c if c.isprintable() else "?" for c in cut)


def token_problem(token: object) -> str | None:
    """Why ``token`` cannot be a bearer token (None when it can): a non-empty string of
    printable ASCII without spaces (RFC 6750's b64token is stricter), at most
    :data:`MAX_TOKEN` characters. The reason never quotes the token."""
    if not isinstance(token, str) or not token:
        return "no token"
    if len(token) > MAX_TOKEN:
        return f"a token over {MAX_TOKEN} characters"
    if not _TOKEN.fullmatch(token):
        return "a token with characters a bearer token cannot have"
    return None


def lifetime(value: object) -> int | None:
    """``expires_in`` as stated: None (unknown) or whole seconds in 0..:data:`MAX_LIFETIME`;
    raises ValueError for anything else (a float, a string, 1e308, 400 digits, a bool)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expires_in is not a whole number of seconds")
    if not 0 <= value <= MAX_LIFETIME:
        raise ValueError(f"expires_in is outside 0..{MAX_LIFETIME}")
    return value


def decode_json(body: bytes) -> Any:
    """``body`` as JSON; ValueError for anything that is not (too large, not UTF-8, nested
    deeper than the interpreter's recursion limit, a number of thousands of digits)."""
    if len(body) > MAX_BODY:
        raise ValueError(f"body over {MAX_BODY} bytes")
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        raise ValueError("not JSON") from None


def _error_fields(response: Answer) -> tuple[str | None, str]:
    """The RFC 6749 ``error`` and ``error_description`` of a refusal, if it has them, fit
    to relay (:func:`printable`): from the body when it is JSON, else the reason phrase."""
    error: str | None = None
    description = response.reason_phrase or f"HTTP {response.status_code}"
    try:
        body = decode_json(response.content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("error"), str):
            error = printable(body["error"], MAX_ERROR_CODE)
        if isinstance(body.get("error_description"), str) and body["error_description"]:
            description = body["error_description"]
    return error, printable(description)


def _expires_at(value: object, expires_in: int | None, wall_now: float) -> str | None:
    """The server's RFC 3339 expiry when it looks like one (passed on for display), else
    one computed from ``expires_in``."""
    if isinstance(value, str) and len(value) <= 40 and value.isascii() and value.isprintable():
        return value
    return None if expires_in is None else rfc3339(wall_now + expires_in)


def parse_token_response(
    response: Answer, url: str, *, fetched_at: float, wall_now: float
) -> FetchedToken:
    """Turn a token endpoint's answer into a :class:`FetchedToken` or raise one of the
    client's errors: the one reading of a token answer, for the client library and the
    sidecar alike. Whatever the bytes, nothing else is raised, and no message quotes the
    token or more than :data:`MAX_DESCRIPTION` characters of upstream text."""
    status = response.status_code
    if not 100 <= status <= 599:
        raise TokenUnavailable(f"{url}: answered status {status}, which HTTP does not have", url)
    if status == 200:
        try:
            body = decode_json(response.content)
            if not isinstance(body, dict):
                raise ValueError("not an object")
            problem = token_problem(body.get("token"))
            if problem is not None:
                raise ValueError(problem)
            expires_in = lifetime(body.get("expires_in"))
            expires_at = _expires_at(body.get("expires_at"), expires_in, wall_now)
        except ValueError as exc:
            # The CP never answers 200 without a token: something in the path (an ingress,
            # a half-deployed server) misbehaves. Treated as transient, bounded by the deadline.
            raise TokenUnavailable(
                f"{url}: answered 200 without a usable token JSON body ({exc})", url
            ) from None
        return FetchedToken(body["token"], expires_in, expires_at, fetched_at)
    error, description = _error_fields(response)
    if status in (401, 403):
        raise TokenRejected(status, description, url)
    if status == 429 or status >= 500:
        retry_after = parse_retry_after(response.headers.get("retry-after"), wall_now)
        label = printable(f"{error}: {description}" if error else description)
        raise TokenUnavailable(f"{url}: HTTP {status} ({label})", url, retry_after=retry_after)
    if 300 <= status < 400:
        location = printable(response.headers.get("location", "?"))
        raise TokenError(
            f"{url} redirected ({status}) to {location}; not followed: the credential is only "
            "sent to the configured URL (configure the final URL)"
        )
    raise TokenError(f"{url}: unexpected HTTP {status} ({description})")
