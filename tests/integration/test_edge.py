"""The serving layer's edge limits on real loopback sockets, in this process, with short
limits injected (the real defaults are exercised against `cp-token serve` in
test_cp_hostile_http.py): head time and size, keep-alive, the connection cap, the
absolute-form marker, for both uvicorn protocols."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from starlette.types import Receive, Scope, Send

from cp_token.http.edge import EdgeLimits, EdgeListener, HttpImplementation, absolute_form
from cp_token.http.serving import bind_listener, edge_server

IMPLEMENTATIONS: list[HttpImplementation] = ["httptools", "h11"]
REQUEST = b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
HEAD_START = b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "


class App:  # an ASGI app
    """Answers ``absolute=<bool>``; ``/slow`` first waits ``slow`` seconds."""

    def __init__(self, slow: float = 0.0) -> None:
        self.calls = 0
        self.slow = slow

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        if scope["path"] == "/slow":
            await asyncio.sleep(self.slow)
        if scope["path"] == "/whole-body":
            more = True
            while more:
                message = await receive()
                more = message.get("more_body", False)
        body = f"absolute={absolute_form(scope)}".encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serving(
    app: App,
    limits: EdgeLimits,
    http: HttpImplementation = "httptools",
    max_connections: int = 100,
    tls: tuple[str, str] | None = None,
) -> AsyncIterator[EdgeListener]:
    sock = bind_listener("127.0.0.1", 0, max_connections=max_connections, limit_name="TEST_CAP")
    cert, key = tls or (None, None)
    server = edge_server(app, limits=limits, http=http, ssl_certfile=cert, ssl_keyfile=key)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert server.started
    try:
        yield sock
    finally:
        server.should_exit = server.force_exit = True
        await task


async def connect(sock: EdgeListener) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = sock.getsockname()[1]
    return await asyncio.open_connection("127.0.0.1", port)


async def seconds_until_closed(reader: asyncio.StreamReader, deadline: float = 10.0) -> float:
    """Read (discarding) until the server closes; the time it took."""
    start = time.monotonic()
    async with asyncio.timeout(deadline):
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
    return time.monotonic() - start


async def assert_refused_mid_stream(writer: asyncio.StreamWriter) -> None:
    """Stream an endless header value: the server must close long before 16 MiB."""
    sent, start = 0, time.monotonic()
    with contextlib.suppress(ConnectionError):
        while sent < 64 * 1024 * 1024 and time.monotonic() - start < 10:
            writer.write(b"a" * 65536)
            await writer.drain()
            sent += 65536
    assert sent < 16 * 1024 * 1024, f"the server read {sent} bytes of one head"


async def response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await asyncio.wait_for(reader.readexactly(length), 5)


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
async def test_no_complete_head_in_time_closes_the_connection(http: HttpImplementation) -> None:
    limits = EdgeLimits(head_timeout=0.5, keep_alive_timeout=5)
    async with serving(App(), limits, http) as sock:
        empty_r, _empty_w = await connect(sock)
        half_r, half_w = await connect(sock)
        half_w.write(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        trickle_r, trickle_w = await connect(sock)

        async def trickle() -> None:  # one byte every 50 ms never resets the timer
            for byte in b"GET /x HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                trickle_w.write(bytes([byte]))
                await asyncio.sleep(0.05)

        feeder = asyncio.create_task(trickle())
        readers = (empty_r, half_r, trickle_r)
        times = await asyncio.gather(*(seconds_until_closed(r) for r in readers))
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await feeder
    for seconds in times:
        assert 0.4 <= seconds <= 2.5, times


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
async def test_keep_alive_idle_is_closed_and_a_later_half_head_times_out(
    http: HttpImplementation,
) -> None:
    async with serving(App(), EdgeLimits(head_timeout=5, keep_alive_timeout=0.3), http) as sock:
        reader, writer = await connect(sock)
        writer.write(REQUEST)
        assert b"absolute=False" in await response(reader)
        assert 0.2 <= await seconds_until_closed(reader) <= 2.5
    async with serving(App(), EdgeLimits(head_timeout=0.5, keep_alive_timeout=5), http) as sock:
        reader, writer = await connect(sock)
        writer.write(REQUEST)
        await response(reader)
        writer.write(b"GET /x HTTP/1.1\r\n")  # the next head never completes
        assert 0.4 <= await seconds_until_closed(reader) <= 2.5  # the head limit, not 5 s


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
async def test_a_slow_response_is_not_cut_by_the_head_timer(http: HttpImplementation) -> None:
    app = App(slow=1.0)
    async with serving(app, EdgeLimits(head_timeout=0.3, keep_alive_timeout=0.3), http) as sock:
        reader, writer = await connect(sock)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await response(reader)).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
async def test_a_head_over_the_limit_is_refused(http: HttpImplementation) -> None:
    app = App()
    async with serving(app, EdgeLimits(max_head_bytes=64 * 1024), http) as sock:
        # just below the limit: served
        reader, writer = await connect(sock)
        writer.write(HEAD_START + b"a" * 60_000 + b"\r\n\r\n")
        assert (await response(reader)).startswith(b"HTTP/1.1 200")
        writer.close()
        # complete, but over the limit, in one write: refused, the app never sees it
        reader, writer = await connect(sock)
        writer.write(HEAD_START + b"a" * 100_000 + b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            status = await asyncio.wait_for(reader.readline(), 5)
            assert status.split()[1:2] in ([b"431"], []), status  # [] if reset before
        assert await seconds_until_closed(reader) < 5
        # streamed and never terminated: closed long before the client is done
        reader, writer = await connect(sock)
        writer.write(HEAD_START)
        await assert_refused_mid_stream(writer)
    assert app.calls == 1


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
async def test_a_large_body_is_not_taken_for_a_head(http: HttpImplementation) -> None:
    """A body over the head limit, answered before or after it is read, on one connection."""
    body = b"b" * 200_000
    async with serving(App(), EdgeLimits(max_head_bytes=64 * 1024), http) as sock:
        reader, writer = await connect(sock)
        for path in (b"/early", b"/whole-body", b"/early"):
            writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            writer.write(b"Content-Length: %d\r\n\r\n" % len(body))
            for i in range(0, len(body), 16384):
                writer.write(body[i : i + 16384])
                await writer.drain()
                await asyncio.sleep(0)
            assert (await response(reader)).startswith(b"HTTP/1.1 200"), path
        writer.write(REQUEST)
        assert (await response(reader)).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
async def test_pipelined_requests_and_a_pipelined_endless_head(http: HttpImplementation) -> None:
    """A head that starts inside the chunk of the previous request is limited too."""
    async with serving(App(), EdgeLimits(max_head_bytes=64 * 1024), http) as sock:
        reader, writer = await connect(sock)
        writer.write(REQUEST + REQUEST)
        assert (await response(reader)).startswith(b"HTTP/1.1 200")
        assert (await response(reader)).startswith(b"HTTP/1.1 200")
        writer.write(REQUEST + HEAD_START)
        assert (await response(reader)).startswith(b"HTTP/1.1 200")
        await assert_refused_mid_stream(writer)


async def test_connections_beyond_the_cap_are_closed_at_once() -> None:
    async with serving(App(), EdgeLimits(head_timeout=30), max_connections=3) as sock:
        held = [await connect(sock) for _ in range(3)]
        refused_r, _ = await connect(sock)
        assert await seconds_until_closed(refused_r, deadline=2) < 1  # not the head timeout
        assert sock.refused >= 1 and sock.open_connections == 3
        reader, writer = held[0]
        writer.write(REQUEST)
        assert (await response(reader)).startswith(b"HTTP/1.1 200")  # the held ones still work
        for _, w in held:
            w.close()
        deadline = time.monotonic() + 5
        while sock.open_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert sock.open_connections == 0
        reader, writer = await connect(sock)  # room again
        writer.write(REQUEST)
        assert (await response(reader)).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"FOO /token HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # a method no parser knows
        b"GET /token HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer a\x01b\r\n\r\n",
    ],
)
async def test_what_the_parser_refuses_is_a_json_400_never_cached(request_bytes: bytes) -> None:
    """httptools (what the server extra installs) refuses these; h11 lets them through to
    the app, which answers them itself (405, 401)."""
    app = App()
    async with serving(app, EdgeLimits(), "httptools") as sock:
        reader, writer = await connect(sock)
        writer.write(request_bytes)
        answer = await response(reader)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), head
        assert b"cache-control: no-store" in head.lower()
        assert b"content-type: application/json" in head.lower()
        assert json.loads(body)["error"] == "invalid_request"
        assert await seconds_until_closed(reader) < 1  # and the connection is closed
    assert app.calls == 0


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
async def test_an_absolute_form_target_is_marked(http: HttpImplementation) -> None:
    async with serving(App(), EdgeLimits(), http) as sock:
        reader, writer = await connect(sock)
        writer.write(b"GET http://evil.example/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await response(reader)).endswith(b"absolute=True")
        writer.write(REQUEST)
        assert (await response(reader)).endswith(b"absolute=False")


async def test_a_tls_connection_gets_the_head_deadline_from_its_accept(tmp_path: Path) -> None:
    """A TLS handshake that never starts (or never ends) is bounded by the head deadline
    too; asyncio alone would wait 60 s."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    limits = EdgeLimits(head_timeout=0.5)
    async with serving(App(), limits, tls=(str(cert), str(key))) as sock:
        port = sock.getsockname()[1]
        start = time.monotonic()
        no_handshake, _ = await asyncio.open_connection("127.0.0.1", port)
        no_head, _w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        served, served_w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        served_w.write(REQUEST)
        assert (await response(served)).startswith(b"HTTP/1.1 200")
        for reader in (no_handshake, no_head):
            await seconds_until_closed(reader, deadline=5)
            assert time.monotonic() - start <= 2.5
        deadline = time.monotonic() + 5
        while sock.open_connections > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sock.open_connections <= 1  # the server side is gone too, not just the client's
