"""The egress routes' HTTP/1.1 client against raw servers on loopback (real sockets, in
process): framing both ways, keep-alive reuse, stale connections, limits, TLS, errors."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trustme

from sidecar import egress_pool
from sidecar.egress_pool import (
    MAX_HEAD,
    MAX_INFORMATIONAL,
    TLS_READ_BUFFER,
    Origin,
    UntrustedUpstream,
    UpstreamError,
    UpstreamPool,
    split_base,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A loopback server running ``handler`` per connection; counts connections."""

    def __init__(self, handler: Handler, context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.context = context
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=self.context)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def origin(self) -> Origin:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return Origin("https" if self.context else "http", "127.0.0.1", port)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one request: a content-length body or a chunked one, decoded."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        return head, await reader.readexactly(length)
    body = b""
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    return head, body


def ok(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%b\r\n%b" % (len(body), extra, body)


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        _, body = await read_request(reader)
        writer.write(ok(b"got " + body))
        await writer.drain()


async def whole(pool: UpstreamPool, origin: Origin, **kw: Any) -> tuple[int, bytes, Any]:
    method = kw.pop("method", "GET")
    response = await pool.request(
        origin, method, kw.pop("target", b"/x"), kw.pop("headers", []), kw.pop("body", b"")
    )
    body = b"".join([c async for c in response.body()])
    response.close()
    return response.status, body, response.headers


def pool(**kw: Any) -> UpstreamPool:
    return UpstreamPool(ssl.create_default_context(), **kw)


async def test_keep_alive_reuses_one_connection() -> None:
    async with RawServer(keep_answering) as server:
        p = pool()
        for i in range(3):
            status, body, _ = await whole(p, server.origin, method="POST", body=b"%d" % i)
            assert (status, body) == (200, b"got %d" % i)
        assert server.connections == 1 and p.idle == 1
        await p.aclose()


async def test_request_framing_host_and_headers() -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await read_request(reader))
            writer.write(ok())
            await writer.drain()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b""
        yield b"cd"

    async with RawServer(record) as server:
        p = pool()
        origin = server.origin
        await whole(p, origin, target=b"/v1/a%2Fb?q=1", headers=[(b"x-a", b"1")], body=b"xyz")
        await whole(p, origin, method="PUT", body=chunks())
        await whole(p, origin, method="PUT", body=chunks(), headers=[(b"content-length", b"4")])
        await whole(p, origin)
        await p.aclose()
    first = seen[0][0].split(b"\r\n")
    assert first[0] == b"GET /v1/a%2Fb?q=1 HTTP/1.1"
    assert first[1] == b"Host: " + origin.host_header
    assert b"x-a: 1" in first and b"content-length: 3" in first
    assert seen[0][1] == b"xyz"
    assert b"transfer-encoding: chunked" in seen[1][0] and seen[1][1] == b"abcd"
    assert b"transfer-encoding" not in seen[2][0] and seen[2][1] == b"abcd"
    assert b"content-length" not in seen[3][0].lower() and seen[3][1] == b""


def test_host_header_leaves_out_default_ports() -> None:
    assert split_base("https://api.example/v1/")[0].host_header == b"api.example"
    assert split_base("https://api.example:8443")[0].host_header == b"api.example:8443"
    assert split_base("http://[::1]:80/x") == (Origin("http", "::1", 80), "/x")
    assert Origin("http", "::1", 8080).host_header == b"[::1]:8080"


async def test_a_chunked_answer_arrives_piece_by_piece() -> None:
    release = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with RawServer(stream) as server:
        p = pool()
        response = await p.request(server.origin, "GET", b"/", [], b"")
        pieces = response.body()
        assert await anext(pieces) == b"first"  # before the rest was even sent
        release.set()
        assert [c async for c in pieces] == [b"second"]
        response.close()
        assert p.idle == 1


async def test_an_answer_delimited_by_the_connection_closing() -> None:
    async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    async with RawServer(close_delimited) as server:
        p = pool()
        status, body, _ = await whole(p, server.origin)
        assert (status, body) == (200, b"all of it") and p.idle == 0


async def test_head_and_informational_answers() -> None:
    async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if head.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + ok(b"final"))
        await writer.drain()
        await reader.read()

    async with RawServer(answers) as server:
        p = pool()
        status, body, headers = await whole(p, server.origin, method="HEAD")
        assert (status, body) == (200, b"") and (b"content-length", b"1000") in headers
        assert p.idle == 0  # not reused: the parser expected a body that never comes
        status, body, headers = await whole(p, server.origin)
        assert (status, body) == (200, b"final") and all(n != b"link" for n, _ in headers)


async def test_a_kept_connection_the_upstream_closed_is_replaced_once() -> None:
    async def one_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader)
        writer.write(ok())  # keep-alive advertised, then closed anyway
        await writer.drain()

    async with RawServer(one_per_connection) as server:
        p = pool()
        taken: list[Any] = []
        take = p._take
        p._take = lambda origin: taken.append(take(origin)) or taken[-1]  # type: ignore[method-assign]
        assert (await whole(p, server.origin))[0] == 200
        # at once, before the close is seen: the kept connection is tried, then replaced
        assert (await whole(p, server.origin, method="POST", body=b"again"))[0] == 200
        assert taken[1] is not None and taken[1].reused
        assert server.connections == 2


async def test_limits_and_malformed_answers_are_upstream_errors() -> None:
    async def huge_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
        await writer.drain()

    for handler, fragment in ((huge_head, "head over"), (garbage, "malformed")):
        async with RawServer(handler) as server:
            with pytest.raises(UpstreamError, match=fragment):
                await pool().request(server.origin, "GET", b"/", [], b"")
    async with RawServer(cut) as server:
        p = pool()
        response = await p.request(server.origin, "GET", b"/", [], b"")
        with pytest.raises(UpstreamError, match="closed"):
            [c async for c in response.body()]
        response.close()
        assert p.idle == 0


async def test_connect_errors_and_bad_targets() -> None:
    async with RawServer(keep_answering) as server:
        closed = server.origin
    with pytest.raises(UpstreamError, match="cannot connect"):
        await pool().request(closed, "GET", b"/", [], b"")
    for target in (b"/a b", b"/a\r\nx: y", b"noslash"):
        with pytest.raises(ValueError):
            await pool().request(closed, "GET", target, [], b"")


async def test_tls_is_verified() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    async with RawServer(keep_answering, server_context) as server:
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        p = UpstreamPool(trusting)
        assert (await whole(p, server.origin, method="POST", body=b"tls"))[1] == b"got tls"
        conn = next(iter(p._idle.values()))
        assert conn.transport is not None
        assert conn.transport.get_extra_info("ssl_object") is not None
        assert TLS_READ_BUFFER == 32 * 1024
        with pytest.raises(UpstreamError, match="TLS"):
            await pool().request(server.origin, "GET", b"/", [], b"")  # system roots


async def test_the_connection_cap_makes_calls_wait() -> None:
    async with RawServer(keep_answering) as server:
        p = pool(max_connections=1)
        first = await p.request(server.origin, "GET", b"/", [], b"")
        second = asyncio.ensure_future(whole(p, server.origin))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not second.done()
        first.close()
        assert (await second)[0] == 200
        assert server.connections == 1


async def test_idle_connections_close_after_their_expiry() -> None:
    async with RawServer(keep_answering) as server:
        p = pool(idle_expiry=30)
        await whole(p, server.origin)
        assert p.idle == 1
        p._close_expired()  # too young: kept
        assert p.idle == 1
        for conn in p._idle.values():
            conn.idle_since -= 31
        p._close_expired()
        assert p.idle == 0
        await p.aclose()


async def test_cancelling_a_call_closes_its_connection() -> None:
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()

    async with RawServer(never) as server:
        p = pool(max_connections=1)
        call = asyncio.ensure_future(p.request(server.origin, "GET", b"/", [], b""))
        for _ in range(50):
            await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert p.idle == 0
        # and its slot came back
        other = asyncio.ensure_future(p.request(server.origin, "GET", b"/", [], b""))
        for _ in range(50):
            await asyncio.sleep(0)
        assert not other.done() or other.exception() is None
        other.cancel()


async def test_a_small_head_then_a_large_body_in_one_read_is_not_a_large_head() -> None:
    """Before: every byte of a read that completed the head counted as head, so a short head
    followed by more than 64 KiB of body in the same read was refused as 'too large'."""
    body = b"x" * (3 * MAX_HEAD)

    async def at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(body))
        await writer.drain()
        await reader.read()

    async with RawServer(at_once) as server:
        status, got, _ = await whole(pool(), server.origin)
    assert (status, got) == (200, body)


async def test_informational_answers_are_bounded() -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"

    def answering(count: int) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(early * count + ok(b"final"))
            await writer.drain()
            await reader.read()

        return handler

    async with RawServer(answering(MAX_INFORMATIONAL)) as server:
        assert (await whole(pool(), server.origin))[:2] == (200, b"final")
    async with RawServer(answering(MAX_INFORMATIONAL + 1)) as server:
        with pytest.raises(UpstreamError, match="informational"):
            await whole(pool(), server.origin)


async def test_a_request_that_says_connection_close_keeps_no_connection() -> None:
    async with RawServer(keep_answering) as server:  # would keep it alive
        p = pool()
        await whole(p, server.origin, headers=[(b"Connection", b"close")])
        assert p.idle == 0
        await whole(p, server.origin)
        assert p.idle == 1
        await p.aclose()


async def test_read_bounds_the_whole_body() -> None:
    async def sized(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            if b"/length" in head:  # a declared length over the limit
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
            elif b"/chunked" in head:  # no length: refused once it grows past the limit
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                writer.write((b"64\r\n" + b"y" * 100 + b"\r\n") * 2)
            else:
                writer.write(ok(b"y" * 150))
            await writer.drain()

    async with RawServer(sized) as server:
        p = pool()
        response = await p.request(server.origin, "GET", b"/length", [], b"")
        with pytest.raises(UpstreamError, match=r"^response body over 150 bytes \(Content-Length"):
            await response.read(150)
        assert response.headers and not response.finished  # nothing of the body was awaited
        response.close()
        response = await p.request(server.origin, "GET", b"/chunked", [], b"")
        with pytest.raises(UpstreamError, match=r"^response body over 150 bytes$"):
            await response.read(150)
        response.close()
        assert p.idle == 0  # both connections abandoned mid-answer: closed
        response = await p.request(server.origin, "GET", b"/fits", [], b"")
        assert await response.read(150) == b"y" * 150
        response.close()
        assert p.idle == 1
        await p.aclose()


@pytest.mark.parametrize("small_buffer", [True, False])
async def test_tls_through_the_small_buffer_layer_or_asyncio_s_own(
    small_buffer: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 32 KiB layer subclasses a private asyncio class; where it is not as expected the
    pool falls back to ``create_connection(ssl=...)``: both verify and both work."""
    if not small_buffer:
        monkeypatch.setattr(egress_pool, "_TLS_LAYER", None)
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    async with RawServer(keep_answering, server_context) as server:
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        p = UpstreamPool(trusting)
        assert (await whole(p, server.origin, method="POST", body=b"tls"))[1] == b"got tls"
        conn = next(iter(p._idle.values()))
        layer = conn.transport._ssl_protocol  # type: ignore[union-attr]
        assert layer.max_size == (TLS_READ_BUFFER if small_buffer else 256 * 1024)
        await p.aclose()
        with pytest.raises(UntrustedUpstream, match="does not verify") as info:
            await pool().request(server.origin, "GET", b"/", [], b"")  # system roots
        assert isinstance(info.value.cause, ssl.SSLCertVerificationError)
        with pytest.raises(UpstreamError, match="https is not configured"):
            await UpstreamPool(None).request(server.origin, "GET", b"/", [], b"")


def test_the_small_buffer_layer_only_where_asyncio_has_the_expected_class(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer = egress_pool._small_buffer_tls()
    assert layer is not None and layer.max_size == TLS_READ_BUFFER  # 3.11 to 3.13

    class Elsewhere:
        def __init__(self, loop: object, app_protocol: object) -> None: ...

    monkeypatch.setattr(asyncio.sslproto, "SSLProtocol", Elsewhere)
    assert egress_pool._small_buffer_tls() is None  # no max_size
    monkeypatch.setattr(Elsewhere, "max_size", 1024, raising=False)
    assert egress_pool._small_buffer_tls() is None  # another constructor
    monkeypatch.delattr(asyncio.sslproto, "SSLProtocol")
    assert egress_pool._small_buffer_tls() is None
