"""The client's HTTP reading of a token answer (``parse_token_response``, piece by piece and
fuzzed: lifetimes, token characters, relayed text cut to one line of 300 characters),
the TLS context of each endpoint (no CA store for plain HTTP, the given CA for HTTPS), and proxy
variables that never route the token request (loopback servers, no fakes)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from cp_token.client import TokenError, TokenRejected, TokenSource, TokenUnavailable
from cp_token.client._http import (
    MAX_DESCRIPTION,
    MAX_LIFETIME,
    RawAnswer,
    client_options,
    lifetime,
    parse_token_response,
    printable,
    token_problem,
)
from tests.fakes.hostile_upstream import MAX_MESSAGE, SECRET


class _Recorder(BaseHTTPRequestHandler):
    hits: list[str]

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = json.dumps(
            {"token": "direct", "token_type": "Bearer", "expires_at": None, "expires_in": None}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def servers() -> Iterator[tuple[str, list[str], str, list[str]]]:
    """(cp_url, cp_hits, proxy_url, proxy_hits)"""
    started = []
    hits: list[list[str]] = [[], []]
    for recorded in hits:
        handler = type("Handler", (_Recorder,), {"hits": recorded})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        started.append(server)
    cp, proxy = (f"http://127.0.0.1:{s.server_address[1]}" for s in started)
    yield f"{cp}/token", hits[0], proxy, hits[1]
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy"])
async def test_proxy_variables_are_ignored(
    monkeypatch: pytest.MonkeyPatch,
    servers: tuple[str, list[str], str, list[str]],
    variable: str,
) -> None:
    cp_url, cp_hits, proxy_url, proxy_hits = servers
    monkeypatch.setenv(variable, proxy_url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    source = TokenSource(sidecar_url=cp_url, deadline=2.0)
    assert source.token() == "direct"
    source.invalidate()
    assert await source.atoken() == "direct"
    await source.aclose()
    assert proxy_hits == []
    assert len(cp_hits) == 2


def answer(status: int, body: bytes = b"", **headers: str) -> RawAnswer:
    return RawAnswer(status, "Reason", {k.replace("_", "-"): v for k, v in headers.items()}, body)


def parse(raw: RawAnswer):  # type: ignore[no-untyped-def]
    return parse_token_response(raw, "http://cp/token", fetched_at=0.0, wall_now=1.7e9)


def test_lifetime_bounds() -> None:
    assert lifetime(None) is None
    assert lifetime(0) == 0 and lifetime(900) == 900 and lifetime(MAX_LIFETIME) == MAX_LIFETIME
    for bad in (MAX_LIFETIME + 1, -1, 1e308, 900.0, True, "900", 10**400):
        with pytest.raises(ValueError):
            lifetime(bad)


def test_token_characters() -> None:
    assert token_problem("eyJ.a-b_c~+/=") is None
    for bad in ("", "a b", "a\nb", "a\x00b", "a\ud800", "é", "a" * 16385, None, 5):
        assert token_problem(bad) is not None
    assert SECRET not in (token_problem(f"{SECRET}\n") or "")


def test_relayed_text_is_cut_and_one_line() -> None:
    assert printable("x" * 1000) == "x" * MAX_DESCRIPTION
    assert printable("a\nb\x00c\ud800") == "a?b?c?"


def test_a_non_json_error_text_is_cut_to_300_characters() -> None:
    """Before: a refusal with a text body relayed the reason phrase whole (60 KB)."""
    raw = RawAnswer(403, "y" * 60_000, {}, b"z" * 60_000)
    with pytest.raises(TokenRejected) as info:
        parse(raw)
    assert info.value.description == "y" * MAX_DESCRIPTION
    raw = RawAnswer(502, "y" * 60_000, {"location": "x"}, b"not json")
    with pytest.raises(TokenUnavailable) as busy:
        parse(raw)
    assert len(str(busy.value)) < MAX_DESCRIPTION + 60


def test_a_redirect_location_is_cut() -> None:
    with pytest.raises(TokenError) as info:
        parse(answer(302, location="http://x/" + "a\n" * 30_000))
    assert len(str(info.value)) < MAX_DESCRIPTION + 200 and "\n" not in str(info.value)


def test_a_status_http_does_not_have_is_a_bad_answer() -> None:
    for status in (0, 99, 600, 999):
        with pytest.raises(TokenUnavailable, match="HTTP does not have"):
            parse(answer(status))


@settings(max_examples=300, deadline=None)
@given(
    status=st.integers(min_value=-5, max_value=1200),
    reason=st.text(max_size=50),
    headers=st.dictionaries(
        st.sampled_from(["retry-after", "location", "content-type"]), st.text(max_size=40)
    ),
    body=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
            max_leaves=20,
        ).map(lambda v: repr(v).encode()),
        st.fixed_dictionaries(
            {"token": st.text(max_size=30), "expires_in": st.integers() | st.floats()}
        ).map(lambda d: json.dumps(d).encode()),
    ),
)
def test_parse_token_response_raises_only_token_errors(
    status: int, reason: str, headers: dict[str, str], body: bytes
) -> None:
    try:
        token = parse(RawAnswer(status, reason, headers, body))
    except TokenError as exc:
        assert len(str(exc)) <= MAX_MESSAGE
        assert "\n" not in str(exc)
    else:
        assert token_problem(token.token) is None
        assert token.expires_in is None or 0 <= token.expires_in <= MAX_LIFETIME


def test_an_http_endpoint_loads_no_ca_store() -> None:
    plain = client_options(None, 5.0, tls=False)["verify"]
    assert plain.get_ca_certs() == []
    assert plain.verify_mode.name == "CERT_REQUIRED"  # still verifies: trusts nothing
    assert plain.check_hostname


def test_an_https_endpoint_loads_the_given_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    context = client_options(str(bundle), 5.0, tls=True)["verify"]
    assert len(context.get_ca_certs()) == 1
