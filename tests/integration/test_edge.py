"""The serving layer's edge limits on real loopback sockets, in this process, with short
limits injected (the real defaults are exercised against `cp-token serve` in
test_cp_hostile_http.py): head time and size, keep-alive, the connection cap, the
absolute-form marker, for both uvicorn protocols."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trustme
import uvicorn
from starlette.types import Receive, Scope, Send

from cp_token.http.edge import (
    EdgeLimits,
    EdgeListener,
    HttpImplementation,
    absolute_form,
    buffered_request_bytes,
    edge_protocol,
)
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
    max_per_client: int = 0,
) -> AsyncIterator[EdgeListener]:
    sock = bind_listener(
        "127.0.0.1",
        0,
        max_connections=max_connections,
        limit_name="TEST_CAP",
        max_per_client=max_per_client,
    )
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


def test_the_uvicorn_under_test() -> None:
    """``make edge-uvicorn`` runs this module on the oldest and newest uvicorn the pin allows,
    each shadowing the venv's copy; it names the version it meant to load."""
    expected = os.environ.get("EDGE_TEST_UVICORN")
    if expected is not None:
        assert uvicorn.__version__ == expected
    for implementation in IMPLEMENTATIONS:  # both protocol classes build on this uvicorn
        protocol = edge_protocol(EdgeLimits(), implementation)
        assert any(c.__module__.startswith("uvicorn.protocols.http.") for c in protocol.__mro__)


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


async def wait_for(predicate: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def connect_from(
    sock: EdgeListener, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = sock.getsockname()[1]
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def is_closed(reader: asyncio.StreamReader, within: float = 2.0) -> bool:
    try:
        return await seconds_until_closed(reader, deadline=within) < within
    except TimeoutError:
        return False


BUSY = b"POST /whole-body HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\nabc"


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
async def test_at_the_cap_the_longest_idle_connection_makes_room(
    http: HttpImplementation,
) -> None:
    """Idle keep-alive connections and ones still waiting for a head are closed, the one
    idle longest first, to admit new ones; busy ones never are."""
    async with serving(App(), EdgeLimits(head_timeout=30), http, max_connections=3) as sock:
        busy_r, busy_w = await connect(sock)
        busy_w.write(BUSY)  # a body in progress: not idle
        kept_r, kept_w = await connect(sock)
        kept_w.write(REQUEST)
        assert (await response(kept_r)).startswith(b"HTTP/1.1 200")  # then idle, keep-alive
        waiting_r, _waiting_w = await connect(sock)  # no head yet
        await wait_for(lambda: sock.open_connections == 3, "three open")
        newer_r, newer_w = await connect(sock)
        assert await is_closed(kept_r)  # idle longest: the keep-alive one
        newer_w.write(REQUEST)
        assert (await response(newer_r)).startswith(b"HTTP/1.1 200")
        last_r, last_w = await connect(sock)
        assert await is_closed(waiting_r)  # then the one that never sent a head
        last_w.write(REQUEST)
        assert (await response(last_r)).startswith(b"HTTP/1.1 200")
        busy_w.write(b"defghij")  # the busy one was never touched
        assert (await response(busy_r)).startswith(b"HTTP/1.1 200")
        assert sock.evicted == 2 and sock.refused == 0


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
async def test_connections_beyond_the_cap_are_closed_at_once_when_none_is_idle(
    http: HttpImplementation,
) -> None:
    async with serving(App(), EdgeLimits(head_timeout=30), http, max_connections=3) as sock:
        held = [await connect(sock) for _ in range(3)]
        for _, writer in held:
            writer.write(BUSY)
        await wait_for(lambda: buffered_request_bytes() >= 9, "three bodies in progress")
        refused_r, _ = await connect(sock)
        assert await seconds_until_closed(refused_r, deadline=2) < 1  # not the head timeout
        assert sock.refused >= 1 and sock.open_connections == 3 and sock.evicted == 0
        reader, writer = held[0]
        writer.write(b"defghij")
        assert (await response(reader)).startswith(b"HTTP/1.1 200")  # the held ones work
        for _, w in held:
            w.close()
        await wait_for(lambda: sock.open_connections == 0, "all closed")
        assert buffered_request_bytes() == 0
        reader, writer = await connect(sock)  # room again
        writer.write(REQUEST)
        assert (await response(reader)).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
async def test_one_address_gets_at_most_its_share_of_connections(
    http: HttpImplementation,
) -> None:
    """At the per-client cap a client's own idle connections make room, never another's;
    with none idle, its new connection is closed at once, and others still get in."""
    async with serving(
        App(), EdgeLimits(head_timeout=30), http, max_connections=20, max_per_client=3
    ) as sock:
        other_r, other_w = await connect_from(sock, "127.0.0.1")  # idle, another address
        hog = [await connect_from(sock, "127.0.0.2") for _ in range(3)]
        await wait_for(lambda: sock.open_connections == 4, "four open")
        newest_r, newest_w = await connect_from(sock, "127.0.0.2")
        assert await is_closed(hog[0][0])  # its own oldest idle one, not the other address's
        assert not await is_closed(other_r, within=0.3)
        for _, writer in (*hog[1:], (newest_r, newest_w)):
            writer.write(BUSY)
        await wait_for(lambda: buffered_request_bytes() >= 9, "three bodies in progress")
        refused_r, _ = await connect_from(sock, "127.0.0.2")
        assert await seconds_until_closed(refused_r, deadline=2) < 1
        fresh_r, fresh_w = await connect_from(sock, "127.0.0.3")
        fresh_w.write(REQUEST)
        assert (await response(fresh_r)).startswith(b"HTTP/1.1 200")
        other_w.write(REQUEST)
        assert (await response(other_r)).startswith(b"HTTP/1.1 200")
        assert sock.evicted == 1 and sock.refused == 1


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


# --- bodies and framing -------------------------------------------------------------------

CHUNKED = b"POST /whole-body HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"


async def status_and_close(reader: asyncio.StreamReader) -> int | None:
    """The status of the answer (None if the connection was closed without one), once the
    connection is closed."""
    data = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                data += chunk
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else None


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
async def test_a_trailer_counts_against_the_head_limit(http: HttpImplementation) -> None:
    app = App()
    async with serving(app, EdgeLimits(max_head_bytes=4096), http) as sock:
        reader, writer = await connect(sock)  # a trailer that fits: served, kept alive
        writer.write(CHUNKED + b"5\r\nhello\r\n0\r\nX-Sum: " + b"a" * 3000 + b"\r\n\r\n")
        assert (await response(reader)).startswith(b"HTTP/1.1 200")
        writer.write(REQUEST)
        assert (await response(reader)).startswith(b"HTTP/1.1 200")
        reader, writer = await connect(sock)  # head + trailer over the limit: 431
        writer.write(CHUNKED + b"5\r\nhello\r\n0\r\nX-Sum: " + b"a" * 4100 + b"\r\n\r\n")
        assert await status_and_close(reader) == 431
        reader, writer = await connect(sock)  # an endless one, answered first: closed
        writer.write(b"POST /early HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"0\r\nX-Endless: ")
        assert (await response(reader)).startswith(b"HTTP/1.1 200")
        await assert_refused_mid_stream(writer)
    assert app.calls == 3  # the app never saw the one over the limit


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
async def test_a_chunk_size_line_over_1_kib_ends_the_connection(http: HttpImplementation) -> None:
    async with serving(App(), EdgeLimits(), http) as sock:
        reader, writer = await connect(sock)  # extensions within 1 KiB: served
        writer.write(CHUNKED + b"5;name=" + b"v" * 1000 + b"\r\nhello\r\n0\r\n\r\n")
        assert (await response(reader)).startswith(b"HTTP/1.1 200")
        reader, writer = await connect(sock)  # in one read with its head
        writer.write(CHUNKED + b"5;name=" + b"v" * 1100 + b"\r\nhello\r\n0\r\n\r\n")
        assert await status_and_close(reader) == 400
        reader, writer = await connect(sock)  # endless: closed long before 16 MiB
        writer.write(CHUNKED + b"1;ext=")
        await assert_refused_mid_stream(writer)
        assert await status_and_close(reader) in (400, None)


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
async def test_a_body_not_whole_in_time_ends_the_connection(http: HttpImplementation) -> None:
    limits = EdgeLimits(body_timeout=0.5, head_timeout=5)
    async with serving(App(slow=1.0), limits, http) as sock:
        stalled_r, stalled_w = await connect(sock)
        stalled_w.write(BUSY)  # 3 of 10 bytes, then nothing
        chunked_r, chunked_w = await connect(sock)
        chunked_w.write(CHUNKED + b"5\r\nhello\r\n")  # never ends
        trickle_r, trickle_w = await connect(sock)
        trickle_w.write(b"POST /whole-body HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")

        async def trickle() -> None:  # a byte every 50 ms does not make it whole in time
            for _ in range(1000):
                trickle_w.write(b"a")
                await asyncio.sleep(0.05)

        feeder = asyncio.create_task(trickle())
        start = time.monotonic()
        statuses = await asyncio.gather(
            *(status_and_close(r) for r in (stalled_r, chunked_r, trickle_r))
        )
        elapsed = time.monotonic() - start
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await feeder
        assert statuses == [408, 408, 408] and 0.4 <= elapsed <= 2.5, (statuses, elapsed)
        # a whole body is not cut by a slow response
        reader, writer = await connect(sock)
        writer.write(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        assert (await response(reader)).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("http", IMPLEMENTATIONS)
async def test_the_bytes_of_bodies_in_progress_are_bounded(http: HttpImplementation) -> None:
    """Across connections: a new body whose Content-Length does not fit, or any new body
    once they are at the bound, gets 503 at once; a body that would pass it ends its
    connection (503); requests without a body are served; room comes back when the bodies
    are done."""
    limits = EdgeLimits(max_buffered_bytes=100_000)

    def head(length: int) -> bytes:
        return b"POST /whole-body HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length

    async with serving(App(), limits, http) as sock:
        first_r, first_w = await connect(sock)
        first_w.write(head(50_000) + b"a" * 49_999)  # held, one byte short
        await wait_for(lambda: buffered_request_bytes() == 49_999, "the first body held")
        second_r, second_w = await connect(sock)
        second_w.write(head(60_000) + b"b" * 10)  # cannot fit: refused at once
        assert await status_and_close(second_r) == 503
        assert buffered_request_bytes() == 49_999
        _third_r, third_w = await connect(sock)
        third_w.write(head(50_000) + b"c" * 49_999)  # fits, held
        await wait_for(lambda: buffered_request_bytes() == 99_998, "two bodies held")
        fourth_r, fourth_w = await connect(sock)
        fourth_w.write(head(3))  # no byte of it sent, and it does not fit
        assert (await asyncio.wait_for(fourth_r.readline(), 5)).startswith(b"HTTP/1.1 503")
        fifth_r, fifth_w = await connect(sock)
        fifth_w.write(CHUNKED)  # unknown length: admitted while below the bound ...
        fifth_w.write(b"5\r\nhello\r\n")  # ... and ended when it would pass it
        assert await status_and_close(fifth_r) == 503
        assert buffered_request_bytes() == 99_998
        reader, writer = await connect(sock)
        writer.write(REQUEST)  # no body: served
        assert (await response(reader)).startswith(b"HTTP/1.1 200")
        huge_r, huge_w = await connect(sock)  # more than could ever fit: the app's to refuse
        huge_w.write(head(1 << 30).replace(b"/whole-body", b"/early"))
        assert (await asyncio.wait_for(huge_r.readline(), 5)).startswith(b"HTTP/1.1 200")
        third_w.close()  # gone: its bytes are released
        await wait_for(lambda: buffered_request_bytes() == 49_999, "the third released")
        first_w.write(b"a")  # whole: answered, and its bytes are released
        assert (await response(first_r)).startswith(b"HTTP/1.1 200")
        await wait_for(lambda: buffered_request_bytes() == 0, "all released")
        writer.write(head(60_000) + b"d" * 60_000)
        assert (await response(reader)).startswith(b"HTTP/1.1 200")
        assert buffered_request_bytes() == 0
