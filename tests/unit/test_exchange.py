"""POST /oauth2/token (RFC 8693) in-process: every rule of SPEC's table, the shared decision.

The same reviewer table as test_app.py's GET tests (tests/fakes/cp_app.py), so both doors are
checked against one pipeline: same identities, same rate-limit bucket, same audit schema.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import KeySet

from cp_token import exchange as exchange_module
from cp_token.app import ExchangeConfig
from cp_token.credential import MAX_TOKEN_BYTES
from cp_token.errors import InvalidRequest, Unavailable
from cp_token.exchange import MAX_BODY_BYTES, parse_form
from cp_token.http import bodies
from cp_token.identity import Identity
from cp_token.minters import IssuedToken, Minter, MintOptions
from cp_token.minters.jwt import JwtMinter
from cp_token.minters.static import StaticMinter
from cp_token.runtime.clock import FakeClock
from cp_token.runtime.errors import ConfigError
from cp_token.settings.cp import load_settings
from cp_token.wiring import exchange_config
from tests.fakes.cp_app import RUNNER, TABLE, DictReviewer, clock, reviewer
from tests.fakes.cp_app import build as build_app

__all__ = ["clock", "reviewer"]  # fixtures, from tests/fakes/cp_app.py

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TYPE = "urn:ietf:params:oauth:token-type:access_token"
FORM = "application/x-www-form-urlencoded"
AUDIENCES = ("ambient-api-server", "mcp-github", "https://api.example/")
SCOPES = ("sessions:read", "sessions:write")


def jwt_minter(clock: FakeClock) -> JwtMinter:
    return JwtMinter(issuer="https://cp.test", audience="ambient-api-server", ttl=900, clock=clock)


def build(
    clock: FakeClock,
    reviewer: DictReviewer,
    minter: Minter | None = None,
    exchange: ExchangeConfig | None = None,
    **kw: Any,
) -> Any:
    """The CP's app (tests/fakes/cp_app.py), with these allow-lists unless told otherwise."""
    exchange = exchange or ExchangeConfig(audiences=AUDIENCES, scopes=SCOPES)
    return build_app(clock, reviewer, minter=minter, exchange=exchange, **kw)[0]


def form(**fields: Any) -> list[tuple[str, str]]:
    """A valid exchange form for the ``good`` subject, with fields replaced or added."""
    base: dict[str, Any] = {
        "grant_type": GRANT,
        "subject_token": "good",
        "subject_token_type": JWT_TYPE,
    }
    base.update(fields)
    pairs: list[tuple[str, str]] = []
    for name, value in base.items():
        if value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            pairs.append((name, v))
    return pairs


async def post(
    app: Any,
    body: list[tuple[str, str]] | bytes,
    content_type: str | None = FORM,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> httpx.Response:
    raw = body if isinstance(body, bytes) else urlencode(body).encode()
    h = dict(headers or {})
    if content_type is not None:
        h["Content-Type"] = content_type
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
        return await client.request(method, "/oauth2/token", content=raw, headers=h)


async def get_token(app: Any, token: str = "good") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
        return await client.get("/token", headers={"Authorization": f"Bearer {token}"})


def claims(minter: JwtMinter, token: str) -> dict[str, Any]:
    keys = KeySet.import_key_set(minter.jwks())
    return dict(jwt.decode(token, keys, algorithms=["ES256"]).claims)


# --- success ---------------------------------------------------------------------------------


async def test_exchange_issues_the_same_token_as_get(
    clock: FakeClock, reviewer: DictReviewer
) -> None:
    minter = jwt_minter(clock)
    app = build(clock, reviewer, minter)
    resp = await post(app, form())
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers["pragma"] == "no-cache"
    body = resp.json()
    assert set(body) == {"access_token", "issued_token_type", "token_type", "expires_in"}
    assert body["issued_token_type"] == ACCESS_TYPE and body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    c = claims(minter, body["access_token"])
    assert c["sub"] == RUNNER and c["aud"] == "ambient-api-server" and "scope" not in c
    assert c["pod"] == "runner-abc" and c["session_id"] == "abc"
    # the very same pipeline: the review the exchange did is the one GET reuses
    assert (await get_token(app)).status_code == 200
    assert reviewer.calls == 1


async def test_audiences_resources_and_scopes_narrow_the_jwt(
    clock: FakeClock, reviewer: DictReviewer
) -> None:
    minter = jwt_minter(clock)
    app = build(clock, reviewer, minter)
    resp = await post(
        app,
        form(
            audience=["mcp-github", "ambient-api-server", "mcp-github"],
            resource="https://api.example/",
            scope="sessions:read  sessions:write",
        ),
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["scope"] == "sessions:read sessions:write"
    c = claims(minter, body["access_token"])
    assert c["aud"] == ["mcp-github", "ambient-api-server", "https://api.example/"]
    assert c["scope"] == "sessions:read sessions:write"


async def test_one_audience_is_a_string_and_jwt_type_is_echoed(
    clock: FakeClock, reviewer: DictReviewer
) -> None:
    minter = jwt_minter(clock)
    app = build(clock, reviewer, minter)
    resp = await post(app, form(audience="mcp-github", requested_token_type=JWT_TYPE))
    assert resp.status_code == 200, resp.text
    assert resp.json()["issued_token_type"] == JWT_TYPE
    assert claims(minter, resp.json()["access_token"])["aud"] == "mcp-github"


async def test_charset_authorization_unknown_and_empty_params_are_ignored(
    clock: FakeClock, reviewer: DictReviewer
) -> None:
    app = build(clock, reviewer)
    resp = await post(
        app,
        form(client_id="None", client_secret="x", scope="", audience="", foo="bar"),
        content_type="Application/X-WWW-Form-Urlencoded; charset=UTF-8",
        headers={"Authorization": "Basic Tm9uZTo="},
    )
    assert resp.status_code == 200, resp.text
    assert "scope" not in resp.json()


async def test_static_minter_token_is_unchanged_and_cannot_narrow(
    clock: FakeClock, reviewer: DictReviewer
) -> None:
    app = build(clock, reviewer, StaticMinter(token="static-api-token"))
    resp = await post(app, form(audience="mcp-github"))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["access_token"] == "static-api-token"
    assert "expires_in" not in body  # opaque token, unknown expiry
    scoped = await post(app, form(scope="sessions:read"))
    assert (scoped.status_code, scoped.json()["error"]) == (400, "invalid_scope")
    typed = await post(app, form(requested_token_type=JWT_TYPE))
    assert (typed.status_code, typed.json()["error"]) == (400, "invalid_request")


# --- refusals --------------------------------------------------------------------------------

REFUSALS: list[tuple[str, list[tuple[str, str]] | bytes, str | None, int, str]] = [
    ("wrong grant", form(grant_type="client_credentials"), FORM, 400, "unsupported_grant_type"),
    ("no grant", form(grant_type=None), FORM, 400, "invalid_request"),
    ("two grants", form(grant_type=[GRANT, GRANT]), FORM, 400, "invalid_request"),
    ("two subjects", form(subject_token=["good", "good"]), FORM, 400, "invalid_request"),
    ("two scopes", form(scope=["sessions:read", "x"]), FORM, 400, "invalid_request"),
    ("no subject", form(subject_token=None), FORM, 400, "invalid_request"),
    ("no subject type", form(subject_token_type=None), FORM, 400, "invalid_request"),
    ("other subject type", form(subject_token_type=ACCESS_TYPE), FORM, 400, "invalid_request"),
    ("odd requested", form(requested_token_type="urn:x:saml2"), FORM, 400, "invalid_request"),
    ("actor token", form(actor_token="good", actor_token_type=JWT_TYPE), FORM, 400,
     "invalid_request"),
    ("audience", form(audience=["ambient-api-server", "evil"]), FORM, 400, "invalid_target"),
    ("resource", form(resource="https://evil.example/"), FORM, 400, "invalid_target"),
    ("scope", form(scope="sessions:read admin"), FORM, 400, "invalid_scope"),
    ("scope syntax", form(scope='sessions:read "x"'), FORM, 400, "invalid_scope"),
    ("json", b'{"grant_type":"x"}', "application/json", 400, "invalid_request"),
    ("no content type", urlencode(form()).encode(), None, 400, "invalid_request"),
    ("multipart", urlencode(form()).encode(), "multipart/form-data; boundary=x", 400,
     "invalid_request"),
    ("not utf-8", b"grant_type=%ff%fe&subject_token=good", FORM, 400, "invalid_request"),
    ("raw non-ascii", "grant_type=é".encode(), FORM, 400, "invalid_request"),
    ("unknown subject", form(subject_token="nope"), FORM, 400, "invalid_request"),
    ("unbound subject", form(subject_token="unbound"), FORM, 400, "invalid_request"),
    ("not a session SA", form(subject_token="other-sa"), FORM, 400, "invalid_request"),
    ("malformed subject", form(subject_token="a b"), FORM, 400, "invalid_request"),
    ("long subject", form(subject_token="a" * (MAX_TOKEN_BYTES + 1)), FORM, 400,
     "invalid_request"),
    ("65 fields", form(audience=["ambient-api-server"] * 62), FORM, 400, "invalid_request"),
    ("990 fields", b"&".join([b"a=b"] * 990), FORM, 400, "invalid_request"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "body", "content_type", "status", "error"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
async def test_refusals(
    clock: FakeClock,
    reviewer: DictReviewer,
    case: str,
    body: list[tuple[str, str]] | bytes,
    content_type: str | None,
    status: int,
    error: str,
) -> None:
    app = build(clock, reviewer)
    resp = await post(app, body, content_type)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == error
    assert resp.json()["error_description"]
    assert resp.headers["cache-control"] == "no-store"
    assert "www-authenticate" not in resp.headers
    subject_checked = case in ("unknown subject", "unbound subject", "not a session SA")
    assert reviewer.calls == (1 if subject_checked else 0)
    if subject_checked or case.endswith("subject"):
        assert "subject_token" in resp.json()["error_description"]


async def test_refusal_descriptions_never_echo_values(
    clock: FakeClock, reviewer: DictReviewer
) -> None:
    app = build(clock, reviewer)
    secret = "eyJhbGciOiJFUzI1NiJ9.c2VjcmV0.c2ln"
    for body in (form(audience=secret), form(resource=secret), form(subject_token=secret)):
        resp = await post(app, body)
        assert resp.status_code == 400
        assert secret not in resp.text and secret[:12] not in resp.text


async def test_an_unlisted_audience_does_not_learn_the_allow_list(
    clock: FakeClock, reviewer: DictReviewer
) -> None:
    app = build(clock, reviewer)
    for body in (form(audience=["ambient-api-server", "evil"]), form(scope="admin")):
        resp = await post(app, body)
        assert resp.status_code == 400
        description = resp.json()["error_description"]
        assert "not allowed" in description
        assert "ambient-api-server" not in description and "sessions:read" not in description


async def test_64_fields_are_served_and_more_are_refused_before_decoding(
    clock: FakeClock, reviewer: DictReviewer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = build(clock, reviewer)
    assert (await post(app, form(audience=["ambient-api-server"] * 61))).status_code == 200
    decoded: list[str] = []
    real = exchange_module._unescape
    monkeypatch.setattr(exchange_module, "_unescape", lambda raw: decoded.append(raw) or real(raw))
    with pytest.raises(InvalidRequest) as info:
        parse_form(b"&".join([b"audience=x%41"] * 990))
    assert "more than 64 fields" in info.value.description and decoded == []


async def test_body_over_64_kib_is_413(clock: FakeClock, reviewer: DictReviewer) -> None:
    app = build(clock, reviewer)
    padding = "x" * (MAX_BODY_BYTES)
    resp = await post(app, form(padding=padding))
    assert resp.status_code == 413
    assert resp.json()["error"] == "invalid_request"
    assert resp.headers["connection"] == "close"
    assert reviewer.calls == 0


async def asgi_post(
    app: Any, chunks: list[bytes], headers: list[tuple[bytes, bytes]], stall: bool = False
) -> tuple[int, dict[str, str], int]:
    """Drive the ASGI app directly: (status, headers, body chunks it asked for)."""
    received = 0
    events = [
        {"type": "http.request", "body": c, "more_body": stall or i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent: list[dict[str, Any]] = []
    hang = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received < len(events):
            received += 1
            return events[received - 1]
        await hang.wait()  # a client that never sends the rest
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/oauth2/token",
        "raw_path": b"/oauth2/token",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", FORM.encode()), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    hdrs = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], hdrs, received


async def test_body_is_read_incrementally_and_abandoned_early(
    clock: FakeClock, reviewer: DictReviewer
) -> None:
    app = build(clock, reviewer)
    chunk = b"x" * 16384
    # chunked (no Content-Length): stops reading right after the chunk that crosses 64 KiB
    status, _, read = await asgi_post(app, [chunk] * 100, [])
    assert status == 413 and read == 5
    # a declared Content-Length over the limit: refused before reading anything
    status, _, read = await asgi_post(app, [chunk] * 100, [(b"content-length", b"1638400")])
    assert status == 413 and read == 0


async def test_slow_or_cut_body_is_a_400_not_a_500(
    clock: FakeClock, reviewer: DictReviewer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bodies, "BODY_TIMEOUT", 0)  # the first wait for more body ends it
    app = build(clock, reviewer)
    status, _, _ = await asgi_post(app, [b"grant_type="], [], stall=True)
    assert status == 400

    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "http.request", "body": b"grant", "more_body": True}])

    async def receive() -> dict[str, Any]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/oauth2/token",
        "headers": [(b"content-type", FORM.encode())],
        "query_string": b"",
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 400


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_are_405_allow_post(
    clock: FakeClock, reviewer: DictReviewer, method: str
) -> None:
    app = build(clock, reviewer)
    resp = await post(app, form(), method=method)
    assert resp.status_code == 405
    assert resp.headers["allow"] == "POST"
    assert reviewer.calls == 0


# --- the shared pipeline ---------------------------------------------------------------------


async def test_rate_limit_bucket_is_shared_with_get(
    clock: FakeClock, reviewer: DictReviewer
) -> None:
    app = build(clock, reviewer, rate=1.0, burst=2)
    assert (await get_token(app)).status_code == 200
    assert (await post(app, form())).status_code == 200
    limited = await post(app, form())
    assert limited.status_code == 429
    assert limited.json()["error"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert (await get_token(app)).status_code == 429
    clock.advance(1.0)
    assert (await post(app, form())).status_code == 200


async def test_dependency_failure_is_503_with_retry_after(
    clock: FakeClock, reviewer: DictReviewer
) -> None:
    app = build(clock, reviewer)
    reviewer.fail = Unavailable("the Kubernetes API is unavailable", retry_after=7)
    resp = await post(app, form())
    assert resp.status_code == 503
    assert resp.json()["error"] == "temporarily_unavailable"
    assert 7 <= int(resp.headers["retry-after"]) <= 14  # 7 s, spread over 7 to 14


async def test_audit_line_is_the_same_with_event_token_exchange(
    clock: FakeClock, reviewer: DictReviewer, caplog: pytest.LogCaptureFixture
) -> None:
    app = build(clock, reviewer)
    with caplog.at_level(logging.INFO, logger="cp_token.audit"):
        issued = (await post(app, form())).json()["access_token"]
        await get_token(app)
        await post(app, form(subject_token="unbound"))
        await post(app, form(audience="evil"))
    lines = [r.audit for r in caplog.records if r.name == "cp_token.audit"]  # type: ignore[attr-defined]
    assert [(a["event"], a["outcome"], a["reason"]) for a in lines] == [
        ("token_exchange", "issued", "ok"),
        ("token_request", "issued", "ok"),
        ("token_exchange", "access_denied", "not_pod_bound"),
        ("token_exchange", "invalid_target", "audience_not_allowed"),
    ]
    assert set(lines[0]) == set(lines[1])
    assert lines[0]["username"] == RUNNER and lines[0]["pod"] == "runner-abc" and lines[0]["jti"]
    assert issued not in caplog.text and issued[:20] not in json.dumps(lines)


class ExplodingReviewer(DictReviewer):
    async def review(self, token: str) -> Identity:
        self.calls += 1
        raise RuntimeError(f"bug while looking at {token}")


class ExplodingMinter:
    problem = None

    async def mint(self, identity: Identity, options: MintOptions = MintOptions()) -> IssuedToken:
        raise KeyError("bug in the minter")

    async def run(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("where", ["reviewer", "minter"])
async def test_unexpected_exception_is_503_audited_internal_logged_once(
    clock: FakeClock, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    if where == "reviewer":
        app = build(clock, ExplodingReviewer({}))
    else:
        app = build(clock, DictReviewer(dict(TABLE)), ExplodingMinter())  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO):
        got = await get_token(app, "good")
        exchanged = await post(app, form())
    for resp in (got, exchanged):
        assert resp.status_code == 503
        assert resp.json()["error"] == "temporarily_unavailable"
        assert int(resp.headers["retry-after"]) >= 1
        assert "good" not in resp.text
    audits = [r.audit for r in caplog.records if r.name == "cp_token.audit"]  # type: ignore[attr-defined]
    assert [(a["event"], a["outcome"], a["reason"]) for a in audits] == [
        ("token_request", "internal", "internal"),
        ("token_exchange", "internal", "internal"),
    ]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2  # once per request
    kind = "RuntimeError" if where == "reviewer" else "KeyError"
    assert all(kind in r.getMessage() and r.exc_info is None for r in errors)
    assert "bug while looking at" not in caplog.text  # the message may carry input: not logged


# --- GET /token: the 16 KiB rule ---------------------------------------------------------------


async def test_oversized_bearer_is_401_without_a_review(
    clock: FakeClock, reviewer: DictReviewer, caplog: pytest.LogCaptureFixture
) -> None:
    app = build(clock, reviewer)
    with caplog.at_level(logging.INFO, logger="cp_token.audit"):
        resp = await get_token(app, "a" * (MAX_TOKEN_BYTES + 1))
    assert resp.status_code == 401
    assert resp.json()["error"] == "invalid_token"
    assert resp.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert reviewer.calls == 0
    assert caplog.records[-1].audit["reason"] == "too_long"  # type: ignore[attr-defined]
    # exactly 16 KiB is not "too long": it reaches the reviewer (which does not know it)
    assert (await get_token(app, "a" * MAX_TOKEN_BYTES)).status_code == 401
    assert reviewer.calls == 1


# --- RFC 8414 metadata -----------------------------------------------------------------------


async def metadata(app: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
        return await client.get("/.well-known/oauth-authorization-server")


async def test_metadata_with_the_jwt_minter(clock: FakeClock, reviewer: DictReviewer) -> None:
    app = build(
        clock,
        reviewer,
        exchange=ExchangeConfig(
            audiences=AUDIENCES, scopes=SCOPES, token_endpoint="https://cp.test/oauth2/token"
        ),
    )
    resp = await metadata(app)
    assert resp.status_code == 200
    meta = resp.json()
    assert meta["issuer"] == "https://cp.test"
    assert meta["token_endpoint"] == "https://cp.test/oauth2/token"
    assert meta["grant_types_supported"] == [GRANT]
    assert meta["token_endpoint_auth_methods_supported"] == ["none"]
    assert meta["jwks_uri"] == "https://cp.test/.well-known/jwks.json"
    assert meta["scopes_supported"] == list(SCOPES)


async def test_metadata_without_an_issuer_is_404(clock: FakeClock, reviewer: DictReviewer) -> None:
    static = StaticMinter(token="t")
    assert (await metadata(build(clock, reviewer, static))).status_code == 404
    known = ExchangeConfig(audiences=AUDIENCES, issuer="https://cp.example")
    meta = (await metadata(build(clock, reviewer, static, exchange=known))).json()
    assert meta["issuer"] == "https://cp.example"
    assert meta["token_endpoint"] == "https://cp.example/oauth2/token"
    assert "jwks_uri" not in meta and "scopes_supported" not in meta


# --- configuration ---------------------------------------------------------------------------


def test_exchange_settings_defaults_and_wiring() -> None:
    base = {"CP_TOKEN_MINTER": "jwt", "CP_TOKEN_URL": "https://cp.ns.svc:8443/token"}
    s = load_settings({**base, "CP_TOKEN_TOKEN_AUDIENCE": "api"})
    assert s.exchange_audiences == ("api",) and s.exchange_scopes == ()
    cfg = exchange_config(s)
    assert cfg.issuer == "https://cp.ns.svc:8443"
    assert cfg.token_endpoint == "https://cp.ns.svc:8443/oauth2/token"
    s = load_settings(
        {**base, "CP_TOKEN_EXCHANGE_AUDIENCES": "a, b", "CP_TOKEN_EXCHANGE_SCOPES": "x:read,y"}
    )
    assert s.exchange_audiences == ("a", "b") and s.exchange_scopes == ("x:read", "y")
    static = {"CP_TOKEN_MINTER": "static", "CP_TOKEN_STATIC_TOKEN": "t"}
    assert exchange_config(load_settings(static)).issuer is None


def test_a_scope_that_is_not_a_scope_token_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(
            {
                "CP_TOKEN_MINTER": "jwt",
                "CP_TOKEN_ISSUER": "https://x",
                "CP_TOKEN_EXCHANGE_SCOPES": 'a,"b"',
            }
        )
    assert info.value.variable == "CP_TOKEN_EXCHANGE_SCOPES"


# --- never a 5xx other than 503, whatever arrives ----------------------------------------------

TEXT = st.text(max_size=80)
FIELD_NAMES = st.sampled_from(
    [
        "grant_type",
        "subject_token",
        "subject_token_type",
        "requested_token_type",
        "audience",
        "resource",
        "scope",
        "actor_token",
        "client_id",
    ]
)
FIELD_VALUES = st.one_of(
    TEXT,
    st.sampled_from([GRANT, JWT_TYPE, ACCESS_TYPE, "good", "unbound", "nope", *AUDIENCES]),
    st.sampled_from(SCOPES),
)
FORM_BODIES = st.one_of(
    st.binary(max_size=300),
    st.lists(st.tuples(FIELD_NAMES, FIELD_VALUES), max_size=8).map(lambda p: urlencode(p).encode()),
)
HEADER_VALUE = st.binary(max_size=120).filter(lambda b: not any(c in b for c in b"\r\n\x00"))
HEADERS = st.lists(
    st.tuples(
        st.sampled_from(
            [b"content-type", b"authorization", b"content-length", b"x-any", b"cookie"]
        ),
        st.one_of(HEADER_VALUE, st.sampled_from([FORM.encode(), b"Bearer good"])),
    ),
    max_size=4,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(["/oauth2/token", "/token"]),
    method=st.sampled_from(["POST", "GET", "PUT", "HEAD"]),
    body=FORM_BODIES,
    headers=HEADERS,
)
def test_arbitrary_bodies_and_headers_never_5xx_but_503(
    path: str, method: str, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    clock = FakeClock()
    app = build(clock, DictReviewer(dict(TABLE)))
    sent: list[dict[str, Any]] = []
    events = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive() -> dict[str, Any]:
        return next(events, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(b"content-type", FORM.encode()), *headers],
        "query_string": b"",
        "client": ("127.0.0.1", 5000),
    }
    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    assert status < 500 or status == 503
    assert dict(sent[0]["headers"])[b"cache-control"] == b"no-store"


FORM_TEXT = st.text(alphabet="ab=&+%2AFf3e9 .~-_", max_size=60) | st.builds(
    urlencode, st.lists(st.tuples(FIELD_NAMES, FIELD_VALUES), max_size=6)
)


@settings(max_examples=400, deadline=None)
@given(text=FORM_TEXT)
def test_form_decoding_matches_parse_qsl(text: str) -> None:
    """The hand-rolled fast path decodes exactly as the standard library does."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        with pytest.raises(InvalidRequest):
            parse_form(text.encode())
        return
    expected: dict[str, list[str]] = {}
    for name, value in pairs:
        if value:
            expected.setdefault(name, []).append(value)
    assert parse_form(text.encode()) == expected
