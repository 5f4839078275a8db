"""The sidecar's own HTTP client towards the CP, against scripted raw HTTP/1.1 servers on
127.0.0.1 (plain and TLS): what it sends, every way an answer can be framed, and every
failure mapped to the client library's errors exactly as the httpx-based source maps them."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trustme

from cp_token.client import TokenError, TokenRejected, TokenUnavailable
from cp_token.runtime.clock import FakeClock
from sidecar.upstream import MAX_BODY, UpstreamSource
from tests.fakes.hostile_upstream import HOSTILE_ANSWERS, RawUpstream, check_bad_answer

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
TOKEN_JSON = json.dumps(
    {
        "token": "api-tok",
        "token_type": "Bearer",
        "expires_at": "2030-01-01T00:00:00Z",
        "expires_in": 900,
    }
).encode()


def reply(raw: bytes) -> Handler:
    """A server that reads the request head, records it, and writes ``raw``, then closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(raw)
        await writer.drain()
        writer.close()

    return handle


seen: list[bytes] = []


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    """Start a handler on 127.0.0.1 (optionally TLS); yields its port."""
    servers: list[asyncio.Server] = []
    seen.clear()

    async def start(handler: Handler, context: ssl.SSLContext | None = None) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def source(tmp_path: Path, url: str, **kw: object) -> UpstreamSource:
    sa = tmp_path / "sa"
    if not sa.exists():
        sa.write_text("sa.jwt.token\n")
    return UpstreamSource(cp_url=url, sa_token_file=str(sa), clock=FakeClock(), **kw)  # type: ignore[arg-type]


def ok_with(framing: str) -> bytes:
    if framing == "length":
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(TOKEN_JSON), TOKEN_JSON)
    if framing == "chunked":
        half = len(TOKEN_JSON) // 2
        parts = (TOKEN_JSON[:half], TOKEN_JSON[half:])
        chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts)
        return (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunks
            + b"0\r\nX-T: 1\r\n\r\n"
        )
    return b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + TOKEN_JSON  # until EOF


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_a_token_in_every_framing(
    tmp_path: Path, serve: Callable[..., Awaitable[int]], framing: str
) -> None:
    port = await serve(reply(ok_with(framing)))
    up = source(tmp_path, f"http://127.0.0.1:{port}/cp/token?x=1")
    token = await up.afetch_once()
    assert (token.token, token.expires_in, token.expires_at) == (
        "api-tok",
        900,
        "2030-01-01T00:00:00Z",
    )
    request = seen[0].decode()
    assert request.startswith("GET /cp/token?x=1 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{port}\r\n" in request
    assert "\r\nAuthorization: Bearer sa.jwt.token\r\n" in request
    assert "\r\nConnection: close\r\n" in request


async def test_refusals_and_outages_map_like_the_client_library(
    tmp_path: Path, serve: Callable[..., Awaitable[int]]
) -> None:
    denied = json.dumps(
        {"error": "access_denied", "error_description": "not a session pod"}
    ).encode()
    port = await serve(
        reply(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n%s" % (len(denied), denied))
    )
    with pytest.raises(TokenRejected) as rejected:
        await source(tmp_path, f"http://127.0.0.1:{port}/token").afetch_once()
    assert (rejected.value.status, rejected.value.description) == (403, "not a session pod")

    port = await serve(
        reply(b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 7\r\ncontent-length: 0\r\n\r\n")
    )
    with pytest.raises(TokenUnavailable) as busy:
        await source(tmp_path, f"http://127.0.0.1:{port}/token").afetch_once()
    assert busy.value.retry_after == 7

    port = await serve(
        reply(b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\ncontent-length: 0\r\n\r\n")
    )
    with pytest.raises(TokenError, match="not followed"):
        await source(tmp_path, f"http://127.0.0.1:{port}/token").afetch_once()


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n{}",  # closed short
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",  # 200 without a token
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (MAX_BODY + 1),
        b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n",
        b"HTTP/1.1 200",  # no complete head
    ],
)
async def test_malformed_answers_are_transient(
    tmp_path: Path, serve: Callable[..., Awaitable[int]], raw: bytes
) -> None:
    port = await serve(reply(raw))
    with pytest.raises(TokenUnavailable):
        await source(tmp_path, f"http://127.0.0.1:{port}/token").afetch_once()


async def test_an_oversized_head_is_refused(
    tmp_path: Path, serve: Callable[..., Awaitable[int]]
) -> None:
    port = await serve(reply(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n"))
    with pytest.raises(TokenUnavailable, match="head over"):
        await source(tmp_path, f"http://127.0.0.1:{port}/token").afetch_once()


async def test_no_server_and_a_silent_server_are_transient(
    tmp_path: Path, serve: Callable[..., Awaitable[int]]
) -> None:
    with socket.socket() as probe:  # a port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        refused_port = probe.getsockname()[1]
    with pytest.raises(TokenUnavailable, match=f"127.0.0.1:{refused_port}"):
        await source(tmp_path, f"http://127.0.0.1:{refused_port}/token").afetch_once()

    port = await serve(reply(b""))  # accepts, reads, closes without a word
    with pytest.raises(TokenUnavailable, match="closed before"):
        await source(tmp_path, f"http://127.0.0.1:{port}/token").afetch_once()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; the client's timeout ends the exchange

    port = await serve(silent)
    with pytest.raises(TokenUnavailable, match="timed out"):
        await source(tmp_path, f"http://127.0.0.1:{port}/token", timeout=0.2).afetch_once()


async def test_afetch_retries_transient_failures_on_the_clock(
    tmp_path: Path, serve: Callable[..., Awaitable[int]]
) -> None:
    answers = [b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n", ok_with("length")]

    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()

    port = await serve(flaky)
    token = await source(tmp_path, f"http://127.0.0.1:{port}/token").afetch()
    assert token.token == "api-tok"
    assert answers == []


async def test_tls_verifies_against_the_configured_ca(
    tmp_path: Path, serve: Callable[..., Awaitable[int]]
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    port = await serve(reply(ok_with("length")), server_context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    trusted = source(tmp_path, f"https://localhost:{port}/token", ca_file=str(bundle))
    assert (await trusted.afetch_once()).token == "api-tok"

    untrusted = source(tmp_path, f"https://localhost:{port}/token")
    with pytest.raises(TokenError, match="AMBIENT_CP_CA_FILE") as info:
        await untrusted.afetch_once()
    assert not isinstance(info.value, TokenUnavailable)  # retrying cannot fix trust

    missing = source(tmp_path, f"https://localhost:{port}/token", ca_file=str(tmp_path / "nope"))
    with pytest.raises(TokenError, match="cannot load the CA file"):
        await missing.afetch_once()


async def test_a_token_file_that_could_inject_headers_is_refused(
    tmp_path: Path, serve: Callable[..., Awaitable[int]]
) -> None:
    port = await serve(reply(ok_with("length")))
    (tmp_path / "sa").write_text("abc\r\nX-Injected: 1")
    with pytest.raises(TokenError, match="characters"):
        await source(tmp_path, f"http://127.0.0.1:{port}/token").afetch_once()
    assert seen == []


async def test_proxies_are_never_consulted(
    tmp_path: Path, serve: Callable[..., Awaitable[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    port = await serve(reply(ok_with("length")))
    assert (
        await source(tmp_path, f"http://127.0.0.1:{port}/token").afetch_once()
    ).token == "api-tok"


def test_a_bad_url_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="user-info"):
        source(tmp_path, "http://user:pw@127.0.0.1:1/token")


async def test_a_rotated_service_account_token_is_noticed(
    tmp_path: Path, serve: Callable[..., Awaitable[int]]
) -> None:
    port = await serve(reply(ok_with("length")))
    up = source(tmp_path, f"http://127.0.0.1:{port}/token")
    assert not up.sa_token_changed()  # nothing sent yet
    await up.afetch_once()
    assert not up.sa_token_changed()
    (tmp_path / "sa").write_text("sa.jwt.rotated")
    assert up.sa_token_changed()
    (tmp_path / "sa").unlink()
    assert not up.sa_token_changed()  # unreadable: not a reason to fetch


CASES = sorted(HOSTILE_ANSWERS)


RETRY_AFTER_CASES = [c for c in CASES if c.startswith("retry-after-")]


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    with RawUpstream() as server:
        yield server


@pytest.fixture
def sa_file(tmp_path: Path) -> Path:
    path = tmp_path / "sa"
    path.write_text("sa.jwt.token")
    return path


@pytest.mark.parametrize("case", CASES)
async def test_the_sidecars_http_client(case: str, upstream: RawUpstream, sa_file: Path) -> None:
    fetcher = UpstreamSource(
        cp_url=upstream.url(case), sa_token_file=str(sa_file), clock=FakeClock(), timeout=5
    )
    with pytest.raises(Exception) as info:
        await fetcher.afetch_once()
    check_bad_answer(info.value, case)
    if case in RETRY_AFTER_CASES:  # treated as absent: the backoff decides
        assert isinstance(info.value, TokenUnavailable) and info.value.retry_after is None


async def test_no_connection_is_kept_between_fetches(
    tmp_path: Path, serve: Callable[..., Awaitable[int]]
) -> None:
    """The server would keep the connection alive; the fetch said ``Connection: close``
    and closes it once the answer is read (a fetch every few minutes keeps nothing open)."""
    closed = asyncio.Event()

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ok_with("length"))
        await writer.drain()
        await reader.read()  # until the client closes
        closed.set()
        writer.close()

    port = await serve(keep_alive)
    up = source(tmp_path, f"http://127.0.0.1:{port}/token")
    assert (await up.afetch_once()).token == "api-tok"
    await asyncio.wait_for(closed.wait(), 5)
    await up.aclose()


async def test_informational_answers_and_bodies_are_bounded(
    tmp_path: Path, serve: Callable[..., Awaitable[int]]
) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
    port = await serve(reply(early * 2 + ok_with("length")))
    assert (await source(tmp_path, f"http://127.0.0.1:{port}/t").afetch_once()).token == "api-tok"

    port = await serve(reply(early * 9 + ok_with("length")))
    with pytest.raises(TokenUnavailable, match="informational"):
        await source(tmp_path, f"http://127.0.0.1:{port}/t").afetch_once()

    chunk = b"x" * 65536
    endless = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    endless += b"%x\r\n%s\r\n" % (len(chunk), chunk) * (MAX_BODY // len(chunk) + 2)
    port = await serve(reply(endless))
    with pytest.raises(TokenUnavailable, match=f"body over {MAX_BODY} bytes"):
        await source(tmp_path, f"http://127.0.0.1:{port}/t").afetch_once()


async def test_a_path_outside_ascii_is_sent_percent_encoded(
    tmp_path: Path, serve: Callable[..., Awaitable[int]]
) -> None:
    port = await serve(reply(ok_with("length")))
    await source(tmp_path, f"http://127.0.0.1:{port}/tök%2F?a=é").afetch_once()
    assert seen[0].startswith(b"GET /t%C3%B6k%2F?a=%C3%A9 HTTP/1.1\r\n")
