"""A fake OAuth 2.0 authorization server: the client-credentials token endpoint only.

`FakeIdP` serves ``POST /oauth/token`` on 127.0.0.1 (plain HTTP, or HTTPS with a trustme CA)
following RFC 6749 §4.4 (client credentials grant), §2.3.1 (client authentication by HTTP
Basic, ``client_secret_basic``, or by form fields, ``client_secret_post``) and §5.1/§5.2
(success and error responses). Tokens are random opaque strings.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.servers import BASE_FAULT_MODES, FaultPlan, LoopbackFake, LoopbackServer, gate

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "MALFORMED_MODES",
    "FakeIdP",
    "TokenRequestRecord",
]

DEFAULT_CLIENT_ID = "cp-token"
DEFAULT_CLIENT_SECRET = "cp-token-secret"
_ROUTE = "token"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@dataclass(frozen=True)
class TokenRequestRecord:
    """One token request as received: the form (secret removed) and how the client authed."""

    form: Mapping[str, str]
    auth_method: str | None  # "client_secret_basic", "client_secret_post" or None
    client_id: str | None


def _raw(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        body,
        status_code=status,
        media_type="application/json",
        headers={**_NO_STORE, **(headers or {})},
    )


_BUSY = b'{"error": "temporarily_unavailable"}'

# Malformed answers an IdP (or a proxy in front of it) can give: the red team's (issue 17)
# and neighbours. Fault modes of ``FakeIdP.fail``; each token in them contains "SECRET".
MALFORMED_MODES: dict[str, Callable[[], Response]] = {
    # Starlette sends "¹" as the Latin-1 byte 0xB9; httpx reads it back as "¹"
    "retry_after_superscript": lambda: _raw(503, _BUSY, {"Retry-After": "¹"}),
    "retry_after_400_digits": lambda: _raw(503, _BUSY, {"Retry-After": "9" * 400}),
    "retry_after_overflowing_date": lambda: _raw(
        503, _BUSY, {"Retry-After": "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"}
    ),
    "expires_in_superscript": lambda: _raw(
        200, b'{"access_token": "SECRET-a", "token_type": "Bearer", "expires_in": "\xc2\xb2"}'
    ),
    "expires_in_400_digits": lambda: _raw(
        200, b'{"access_token": "SECRET-b", "expires_in": %s}' % (b"9" * 400)
    ),
    "expires_in_1e308": lambda: _raw(200, b'{"access_token": "SECRET-c", "expires_in": 1e308}'),
    "deep_json": lambda: _raw(200, b"[" * 200_000 + b"]" * 200_000),
    "token_newline": lambda: _raw(
        200, b'{"access_token": "SECRET\\nX-Injected: 1", "expires_in": 3600}'
    ),
    "error_text_60kb": lambda: Response(b"x" * 60_000, status_code=503, media_type="text/plain"),
}


def _same(a: str, b: str) -> bool:
    return secrets.compare_digest(a.encode(), b.encode())


def _oauth_error(
    status: int, error: str, description: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": error, "error_description": description},
        status_code=status,
        headers={**_NO_STORE, **(headers or {})},
    )


class FakeIdP(LoopbackFake):
    """An OAuth 2.0 client-credentials token endpoint on loopback (see module docstring).

    Use as a context manager or call `start()` / `stop()`; every control method is
    thread-safe.
    """

    def __init__(
        self,
        *,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        expires_in: int = 3600,
        tls: bool = False,
    ) -> None:
        self._lock = threading.Lock()
        self._client_id = client_id
        self._client_secret = client_secret
        self._expires_in = expires_in
        self._issued: list[str] = []
        self._records: list[TokenRequestRecord] = []
        app = Starlette(routes=[Route("/oauth/token", self._ep_token, methods=["POST"])])
        self._server = LoopbackServer(app, tls=tls, name="fake-idp")
        modes = BASE_FAULT_MODES | {"invalid_client"} | set(MALFORMED_MODES)
        self._faults = FaultPlan(modes, self._server.notify)

    # -- lifecycle and addresses -------------------------------------------------------------

    @property
    def token_url(self) -> str:
        """The token endpoint, ``<url>/oauth/token``."""
        return f"{self.url}/oauth/token"

    def transport(self) -> httpx.AsyncBaseTransport:
        """The same endpoint in process (no socket, no thread): a unit test's minter calls it
        on the test's own event loop, so waiting for an answer needs no wall-clock time."""
        return httpx.ASGITransport(app=self._server._app)

    # -- control -----------------------------------------------------------------------------

    @property
    def client_id(self) -> str:
        """The client id the IdP accepts."""
        with self._lock:
            return self._client_id

    @property
    def client_secret(self) -> str:
        """The client secret the IdP accepts."""
        with self._lock:
            return self._client_secret

    def set_credentials(self, client_id: str, secret: str) -> None:
        """Accept only this client from now on (e.g. to test a rotated secret)."""
        with self._lock:
            self._client_id = client_id
            self._client_secret = secret

    def set_expires_in(self, seconds: int) -> None:
        """`expires_in` of tokens issued from now on."""
        with self._lock:
            self._expires_in = seconds

    def set_latency(self, seconds: float) -> None:
        """Delay every answer by `seconds`."""
        self._faults.set_latency(seconds)

    def fail(self, mode: str | None, *, times: int | None = None) -> None:
        """Fail token requests: "500", "hang" (held until the next fault change or stop),
        "reset" (TCP reset, no response), "invalid_client" (401 whatever the credentials),
        a malformed answer (a key of `MALFORMED_MODES`), or None to clear. `times`: only
        the next N requests."""
        self._faults.fail(None, mode, times=times)

    def calls(self) -> int:
        """Token requests received (faulted ones included) since `reset_counts()`."""
        return self._faults.calls(_ROUTE)

    def reset_counts(self) -> None:
        """Zero the counter and forget recorded requests (issued tokens are kept)."""
        self._faults.reset_counts()
        with self._lock:
            self._records.clear()

    @property
    def issued_tokens(self) -> list[str]:
        """Every access token issued, oldest first."""
        with self._lock:
            return list(self._issued)

    def is_issued(self, token: str) -> bool:
        """Whether `token` is one this IdP issued."""
        with self._lock:
            return token in self._issued

    @property
    def requests(self) -> list[TokenRequestRecord]:
        """Every token request received (authenticated or not), oldest first."""
        with self._lock:
            return list(self._records)

    @property
    def last_form(self) -> dict[str, str] | None:
        """Form fields of the last token request (``client_secret`` removed), or None."""
        with self._lock:
            return dict(self._records[-1].form) if self._records else None

    @property
    def last_auth_method(self) -> str | None:
        """``client_secret_basic`` / ``client_secret_post`` of the last request, or None."""
        with self._lock:
            return self._records[-1].auth_method if self._records else None

    # -- HTTP --------------------------------------------------------------------------------

    async def _ep_token(self, request: Request) -> Response:
        raw = await request.body()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        pairs = parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
        form: dict[str, str] = {}
        duplicated = False
        for key, value in pairs:
            duplicated = duplicated or key in form
            form[key] = value
        basic = self._basic_credentials(request.headers.get("authorization"))
        post_id, post_secret = form.get("client_id"), form.get("client_secret")
        auth_method: str | None = None
        client_id: str | None = None
        if basic is not None:
            auth_method, client_id = "client_secret_basic", basic[0]
        elif post_id is not None:
            auth_method, client_id = "client_secret_post", post_id
        with self._lock:
            self._records.append(
                TokenRequestRecord(
                    form={k: v for k, v in form.items() if k != "client_secret"},
                    auth_method=auth_method,
                    client_id=client_id,
                )
            )
        challenge = {"WWW-Authenticate": 'Basic realm="fake-idp"'}

        def invalid_client() -> Response:
            return _oauth_error(401, "invalid_client", "Client authentication failed.", challenge)

        early = await gate(
            self._server,
            self._faults,
            _ROUTE,
            request,
            error_500=lambda: _oauth_error(500, "server_error", "injected fault"),
            custom={"invalid_client": invalid_client, **MALFORMED_MODES},
        )
        if early is not None:
            return early

        if content_type != "application/x-www-form-urlencoded":
            return _oauth_error(
                400, "invalid_request", "Content-Type must be application/x-www-form-urlencoded."
            )
        if duplicated:
            return _oauth_error(400, "invalid_request", "A parameter is repeated.")
        if basic is not None and (post_id is not None or post_secret is not None):
            return _oauth_error(
                400, "invalid_request", "More than one client authentication method was used."
            )
        if request.headers.get("authorization") and basic is None:
            return invalid_client()
        if not self._client_ok(basic, post_id, post_secret):
            return invalid_client()
        grant_type = form.get("grant_type")
        if not grant_type:
            return _oauth_error(400, "invalid_request", "Missing grant_type.")
        if grant_type != "client_credentials":
            return _oauth_error(
                400, "unsupported_grant_type", f"Grant type {grant_type!r} is not supported."
            )
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._issued.append(token)
            body: dict[str, Any] = {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": self._expires_in,
            }
        if form.get("scope"):
            body["scope"] = form["scope"]
        return JSONResponse(body, headers=_NO_STORE)

    @staticmethod
    def _basic_credentials(header: str | None) -> tuple[str, str] | None:
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        if not sep:
            return None
        return user, password

    def _client_ok(
        self, basic: tuple[str, str] | None, post_id: str | None, post_secret: str | None
    ) -> bool:
        with self._lock:
            want_id, want_secret = self._client_id, self._client_secret
        if basic is not None:
            user, password = basic
            # RFC 6749 §2.3.1 form-encodes both before Basic; many clients don't. Accept either.
            ids = {user, unquote_plus(user)}
            secrets_ = {password, unquote_plus(password)}
            return want_id in ids and any(_same(s, want_secret) for s in secrets_)
        if post_id is None or post_secret is None:
            return False
        return post_id == want_id and _same(post_secret, want_secret)
