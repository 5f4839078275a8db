"""Sealed mode's HTTP egress over ASGI: a scripted CP, a fake clock, a recording upstream.

The header rules are checked as pure functions first, then every answer of
``ANY /upstream/<name>/<path>`` (guard, 404, 400, 503, redirects, the 401 repeat, metrics)
through the sidecar's app; the real processes, TLS and streaming are in
tests/integration/test_sealed.py.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from pathlib import Path

import pytest

from sidecar.egress import BUFFERED_BODY, request_headers, response_headers
from tests.fakes.client import Script, ok, refused, unavailable
from tests.fakes.sealed_rig import BASE, SealedRig

# --- the header rules ------------------------------------------------------------------------


def test_request_headers_drop_credentials_proxy_and_hop_by_hop() -> None:
    sent = [
        (b"host", b"127.0.0.1:8099"),
        (b"authorization", b"Bearer stolen"),
        (b"cookie", b"session=1"),
        (b"proxy-authorization", b"Basic x"),
        (b"proxy-connection", b"keep-alive"),
        (b"connection", b"keep-alive, X-Hop"),
        (b"x-hop", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"te", b"trailers"),
        (b"trailer", b"x-sum"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"websocket"),
        (b"expect", b"100-continue"),
        (b"ambient-token-request", b"true"),
        (b"accept", b"text/event-stream"),
        (b"content-type", b"application/json"),
        (b"content-length", b"2"),
        (b"x-request-id", b"abc"),
    ]
    assert request_headers(sent) == [
        (b"accept", b"text/event-stream"),
        (b"content-type", b"application/json"),
        (b"content-length", b"2"),
        (b"x-request-id", b"abc"),
    ]


def test_response_headers_drop_hop_by_hop_and_anything_holding_the_token() -> None:
    got = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"close, X-Internal"),
        (b"X-Internal", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
        (b"Set-Cookie", b"a=1"),
        (b"Location", b"https://elsewhere.example/"),
        (b"X-Echo", b"you sent Bearer tok-123"),
        (b"X-Bell", b"ding\x07"),
    ]
    assert response_headers(got, "tok-123") == [
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        (b"location", b"https://elsewhere.example/"),
    ]


# --- the routes ------------------------------------------------------------------------------


async def test_a_call_goes_to_the_upstream_with_the_held_token_only(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1")), tmp_path)
    response = await rig.call(
        "GET",
        "/upstream/api/sessions/a%2Fb?x=1&y=%20",
        headers={"Authorization": "Bearer mine", "Cookie": "c=1", "X-Request-Id": "r1"},
    )
    assert response.status_code == 200
    assert response.json() == {"path": "/v1/sessions/a%2Fb", "query": "x=1&y=%20", "size": 0}
    assert response.headers["x-upstream"] == "yes"
    assert response.headers["set-cookie"] == "a=1"
    sent = rig.upstream.requests[0]
    assert str(sent.url) == f"{BASE}/sessions/a%2Fb?x=1&y=%20"
    assert sent.headers["host"] == "api.example"
    assert rig.tokens_sent() == [["Bearer t1"]]
    assert "cookie" not in sent.headers and "ambient-token-request" not in sent.headers
    assert sent.headers["x-request-id"] == "r1"
    assert "t1" not in response.text and "t1" not in str(response.headers)


async def test_methods_and_bodies_are_forwarded(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1")), tmp_path)
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        response = await rig.call(method, "/upstream/api/x", content=b"abc")
        assert response.status_code == 200 and response.json()["size"] == 3
    assert [r.method for r in rig.upstream.requests] == ["POST", "PUT", "PATCH", "DELETE"]
    assert rig.upstream.bodies == [b"abc"] * 4
    head = await rig.call("HEAD", "/upstream/api/x")
    assert head.status_code == 200 and head.content == b""


async def test_the_upstream_base_itself(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1")), tmp_path)
    assert (await rig.call("GET", "/upstream/api")).json()["path"] == "/v1"
    assert (await rig.call("GET", "/upstream/api/")).json()["path"] == "/v1/"


@pytest.mark.parametrize(
    "headers",
    [
        {"Ambient-Token-Request": "false"},
        {"Origin": "https://evil.example"},
        {"X-Forwarded-For": "10.0.0.1"},
        {"Forwarded": "for=10.0.0.1"},
        {"Via": "1.1 proxy"},
        {"X-Real-IP": "10.0.0.1"},
        {"Host": "evil.example"},
    ],
)
async def test_the_guard_applies(tmp_path: Path, headers: dict[str, str]) -> None:
    rig = SealedRig(Script(ok("t1")), tmp_path)
    response = await rig.call("GET", "/upstream/api/x", headers=headers)
    assert response.status_code == 403
    assert response.json()["error"] == "access_denied"
    assert rig.upstream.requests == [] and rig.cp.count == 0


async def test_the_guard_header_is_required(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1")), tmp_path)
    response = await rig.client.get("/upstream/api/x")
    assert response.status_code == 403 and "Ambient-Token-Request" in response.text


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        ("/upstream/nope/x", 404, "unknown_upstream"),
        ("/upstream//x", 404, "unknown_upstream"),
        ("/upstream/API/x", 404, "unknown_upstream"),
        ("/upstream/api/../admin", 400, "invalid_request"),
        ("/upstream/api/a/%2e%2e/admin", 400, "invalid_request"),
        ("/upstream/api/a/%2E./admin", 400, "invalid_request"),
        ("/upstream/api/a/..%5Cadmin", 400, "invalid_request"),
        ("/upstream/api/./x", 400, "invalid_request"),
    ],
)
async def test_unknown_names_and_dot_segments(
    tmp_path: Path, path: str, status: int, error: str
) -> None:
    rig = SealedRig(Script(ok("t1")), tmp_path)
    # httpx would normalise the dot segments away: the raw target as a caller can send it
    status_got, headers, body = await raw_call(rig, path)
    assert status_got == status
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body)["error"] == error
    assert rig.upstream.requests == []


async def raw_call(rig: SealedRig, raw_path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """One GET through the app with ``raw_path`` exactly as given (what uvicorn passes)."""
    scope = {
        "type": "http",
        "method": "GET",
        "path": urllib.parse.unquote(raw_path),
        "raw_path": raw_path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8099"), (b"ambient-token-request", b"true")],
    }
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await rig.app(scope, receive, send)
    start, *bodies = sent
    headers = dict(start["headers"])  # type: ignore[call-overload]
    return start["status"], headers, b"".join(m["body"] for m in bodies)  # type: ignore[misc]


async def test_redirects_are_handed_back_not_followed(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1")), tmp_path)
    response = await rig.call("GET", "/upstream/api/moved")
    assert response.status_code == 302
    assert response.headers["location"] == "https://login.example/x"
    assert len(rig.upstream.requests) == 1


async def test_a_header_echoing_the_token_never_reaches_the_caller(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1")), tmp_path)
    response = await rig.call("GET", "/upstream/api/echo")
    assert response.status_code == 200 and "x-echo" not in response.headers


async def test_no_token_is_503_with_retry_after(tmp_path: Path) -> None:
    rig = SealedRig(Script(unavailable(503, "3")), tmp_path)
    response = await rig.call("GET", "/upstream/api/x")
    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"
    assert int(response.headers["retry-after"]) >= 1
    assert rig.upstream.requests == []


@pytest.mark.parametrize(
    "status, error, challenge",
    [(401, "invalid_token", 'Bearer error="invalid_token"'), (403, "access_denied", None)],
)
async def test_a_pod_the_cp_refuses_gets_the_refusal_relayed(
    tmp_path: Path, status: int, error: str, challenge: str | None
) -> None:
    """As GET /token relays it: final (no Retry-After), so a client stops retrying."""
    rig = SealedRig(Script(refused(status, "not a session runner")), tmp_path)
    response = await rig.call("GET", "/upstream/api/x")
    assert response.status_code == status
    assert response.json() == {"error": error, "error_description": "not a session runner"}
    assert response.headers.get("www-authenticate") == challenge
    assert "retry-after" not in response.headers
    assert rig.upstream.requests == []


async def test_a_status_the_server_cannot_write_is_502(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1")), tmp_path)
    response = await rig.call("GET", "/upstream/api/weird")
    assert response.status_code == 502 and "999" in response.json()["error_description"]


async def test_an_unreachable_upstream_is_502(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1")), tmp_path)
    response = await rig.call("GET", "/upstream/api/down")
    assert response.status_code == 502
    assert response.json()["error"] == "upstream_unreachable"
    assert "cannot connect" in response.json()["error_description"]


# --- a 401 from the upstream -----------------------------------------------------------------


async def held_then_revoked(rig: SealedRig) -> None:
    """A first call fetches t1; past the 5 s window the upstream starts refusing it."""
    assert (await rig.call("GET", "/upstream/api/x")).status_code == 200
    rig.clock.advance(10)
    rig.upstream.revoked.add("t1")
    rig.upstream.requests.clear()
    rig.upstream.bodies.clear()


async def test_a_401_fetches_a_fresh_token_and_repeats_once(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1"), ok("t2")), tmp_path)
    await held_then_revoked(rig)
    response = await rig.call("POST", "/upstream/api/x", content=b"small body")
    assert response.status_code == 200
    assert rig.cp.count == 2
    assert rig.tokens_sent() == [["Bearer t1"], ["Bearer t2"]]
    assert rig.upstream.bodies == [b"small body", b"small body"]


async def test_a_second_401_is_passed_back(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1"), ok("t2")), tmp_path)
    await held_then_revoked(rig)
    rig.upstream.revoked.add("t2")
    response = await rig.call("GET", "/upstream/api/x")
    assert response.status_code == 401 and response.json() == {"error": "invalid_token"}
    assert rig.tokens_sent() == [["Bearer t1"], ["Bearer t2"]]  # one repeat, no more
    assert rig.cp.count == 2


async def test_a_401_within_5_s_of_the_last_fetch_does_not_fetch(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1"), ok("t2")), tmp_path)
    rig.upstream.revoked.add("t1")
    response = await rig.call("GET", "/upstream/api/x")
    assert response.status_code == 401
    assert rig.cp.count == 1 and len(rig.upstream.requests) == 1


async def test_concurrent_401s_share_one_refresh(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1"), ok("t2"), ok("t3")), tmp_path)
    await held_then_revoked(rig)
    rig.cp.gate = asyncio.Event()  # the refresh waits until every call got its 401
    calls = [asyncio.create_task(rig.call("GET", "/upstream/api/x")) for _ in range(8)]
    while sum(r == ["Bearer t1"] for r in rig.tokens_sent()) < 8:
        await asyncio.sleep(0)
    rig.cp.gate.set()
    responses = await asyncio.gather(*calls)
    assert [r.status_code for r in responses] == [200] * 8
    assert rig.cp.count == 2  # one shared fetch
    assert sorted(map(tuple, rig.tokens_sent())) == [("Bearer t1",)] * 8 + [("Bearer t2",)] * 8


async def test_a_streamed_body_is_not_repeated(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1"), ok("t2")), tmp_path)
    await held_then_revoked(rig)
    big = b"x" * (BUFFERED_BODY + 1)
    response = await rig.call("PUT", "/upstream/api/x", content=big)
    assert response.status_code == 401
    assert rig.cp.count == 2  # the fresh token is fetched for the next call
    assert rig.tokens_sent() == [["Bearer t1"]] and rig.upstream.bodies == [big]
    again = await rig.call("PUT", "/upstream/api/x", content=big)
    assert again.status_code == 200 and rig.tokens_sent()[-1] == ["Bearer t2"]


async def test_a_body_that_fits_is_repeated_even_when_chunked(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1"), ok("t2")), tmp_path)
    await held_then_revoked(rig)

    async def chunks() -> object:
        for part in (b"a" * 1000, b"b" * 1000):
            yield part

    response = await rig.call("POST", "/upstream/api/x", content=chunks())
    assert response.status_code == 200
    assert rig.upstream.bodies == [b"a" * 1000 + b"b" * 1000] * 2
