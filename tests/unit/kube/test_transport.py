"""The Kubernetes transport against a scripted loopback server: keep-alive, chunked bodies,
stale connections, deadlines, bounds, TLS verification, closing."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trustme

from cp_token.kube.transport import (
    MAX_BODY_BYTES,
    KubeTransport,
    TransportError,
    TransportTimeout,
)

Answer = Callable[[bytes], bytes | None]  # request head+body -> raw answer (None: no answer)


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class Server:
    """A loopback HTTP/1.1 server answering each request with ``answer(request)``."""

    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self.writers:
            writer.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                raw = self.answer(request)
                if raw is None:
                    continue  # hang: never answer this one
                writer.write(raw)
                await writer.drain()
                if b"connection: close" in raw.lower():
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.fixture
async def transports() -> AsyncIterator[list[KubeTransport]]:
    made: list[KubeTransport] = []
    yield made
    for transport in made:
        transport.close()


def transport_for(
    made: list[KubeTransport], url: str, tls: ssl.SSLContext | None = None, maxsize: int = 4
) -> KubeTransport:
    transport = KubeTransport(url, tls, maxsize=maxsize, connect_timeout=2.0)
    made.append(transport)
    return transport


async def get(transport: KubeTransport, path: str = "/x", within: float = 5.0) -> Any:
    return await transport.request(
        "GET", path, [("Accept", "application/json")], None, within=within
    )


async def test_one_connection_serves_every_sequential_call(transports: list[KubeTransport]) -> None:
    async with Server(lambda _: ok()) as server:
        transport = transport_for(transports, server.url)
        for _ in range(5):
            assert await get(transport) == (200, b'{"ok":true}')
        assert server.connections == 1 and len(server.requests) == 5


async def test_request_carries_path_prefix_host_headers_and_body(
    transports: list[KubeTransport],
) -> None:
    async with Server(lambda _: ok()) as server:
        transport = transport_for(transports, server.url + "/prefix/")
        body = b'{"kind":"TokenReview"}'
        await transport.request("POST", "/apis/x", [("X-Test", "1")], body, within=5)
        request = server.requests[0]
        assert request.startswith(b"POST /prefix/apis/x HTTP/1.1\r\n")
        assert b"\r\nHost: 127.0.0.1:" in request and b"\r\nX-Test: 1\r\n" in request
        assert b"\r\nContent-Length: %d\r\n" % len(body) in request and request.endswith(body)


async def test_chunked_answers_are_decoded(transports: list[KubeTransport]) -> None:
    chunked = (
        b'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{"a"\r\n3\r\n:1}\r\n0\r\n\r\n'
    )
    async with Server(lambda _: chunked) as server:
        assert await get(transport_for(transports, server.url)) == (200, b'{"a":1}')


async def test_connection_close_answers_are_not_reused(transports: list[KubeTransport]) -> None:
    async with Server(lambda _: ok(extra=b"connection: close\r\n")) as server:
        transport = transport_for(transports, server.url)
        for _ in range(3):
            assert (await get(transport))[0] == 200
        assert server.connections == 3


async def test_a_connection_the_server_dropped_is_replaced(
    transports: list[KubeTransport],
) -> None:
    async with Server(lambda _: ok()) as server:
        transport = transport_for(transports, server.url)
        assert (await get(transport))[0] == 200
        # The server drops its idle keep-alive connection. Whether the pool sees the close
        # before the next request (a new connection) or only when that request finds no
        # answer on it (sent once more, on a new one), the call succeeds.
        server.writers[0].transport.abort()
        assert (await get(transport))[0] == 200
        assert server.connections == 2 and len(server.requests) == 2


async def test_the_deadline_covers_a_server_that_never_answers(
    transports: list[KubeTransport],
) -> None:
    async with Server(lambda _: None) as server:
        transport = transport_for(transports, server.url)
        with pytest.raises(TransportTimeout):
            await get(transport, within=0.2)
        # the hung connection was dropped: a later call gets a new one
        server.answer = lambda _: ok()
        assert (await get(transport))[0] == 200
        assert server.connections == 2


async def test_calls_beyond_the_pool_wait_for_a_connection(
    transports: list[KubeTransport],
) -> None:
    async with Server(lambda _: ok()) as server:
        transport = transport_for(transports, server.url, maxsize=2)
        results = await asyncio.gather(*(get(transport) for _ in range(6)))
        assert [status for status, _ in results] == [200] * 6
        assert server.connections <= 2


async def test_a_body_over_the_bound_is_refused(transports: list[KubeTransport]) -> None:
    huge = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1)
    huge += b"x" * (MAX_BODY_BYTES + 1)
    async with Server(lambda _: huge) as server:
        with pytest.raises(TransportError, match="over"):
            await get(transport_for(transports, server.url), within=30)


async def test_a_malformed_answer_is_a_transport_error(transports: list[KubeTransport]) -> None:
    async with Server(lambda _: b"NOT HTTP AT ALL\r\n\r\n") as server:
        with pytest.raises(TransportError, match="malformed"):
            await get(transport_for(transports, server.url))


async def test_nothing_listening_is_a_transport_error(transports: list[KubeTransport]) -> None:
    async with Server(lambda _: ok()) as server:
        url = server.url
    with pytest.raises(TransportError, match="cannot connect"):
        await get(transport_for(transports, url))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_tls(ca: trustme.CA, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)
    return ctx


def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def test_tls_keeps_one_verified_connection(
    ca: trustme.CA, transports: list[KubeTransport]
) -> None:
    async with Server(lambda _: ok(), tls=server_tls(ca, "127.0.0.1")) as server:
        transport = transport_for(transports, server.url, client_tls(ca))
        for _ in range(3):
            assert await get(transport) == (200, b'{"ok":true}')
        assert server.connections == 1


async def test_tls_refuses_a_certificate_for_another_name(
    ca: trustme.CA, transports: list[KubeTransport]
) -> None:
    async with Server(lambda _: ok(), tls=server_tls(ca, "other.example")) as server:
        with pytest.raises(TransportError, match="TLS handshake failed"):
            await get(transport_for(transports, server.url, client_tls(ca)))


async def test_tls_refuses_an_unknown_ca(ca: trustme.CA, transports: list[KubeTransport]) -> None:
    async with Server(lambda _: ok(), tls=server_tls(ca, "127.0.0.1")) as server:
        with pytest.raises(TransportError, match="TLS handshake failed"):
            await get(transport_for(transports, server.url, ssl.create_default_context()))


async def test_a_closed_transport_refuses_new_calls(transports: list[KubeTransport]) -> None:
    async with Server(lambda _: ok()) as server:
        transport = transport_for(transports, server.url)
        assert (await get(transport))[0] == 200
        transport.close()
        with pytest.raises(TransportError, match="closed"):
            await get(transport)


async def test_a_caller_that_gives_up_frees_its_connection(
    transports: list[KubeTransport],
) -> None:
    async with Server(lambda _: None) as server:
        transport = transport_for(transports, server.url, maxsize=1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await get(transport, within=60)
        server.answer = lambda _: ok()
        # the only connection slot was given back when the caller gave up
        assert (await get(transport, within=5))[0] == 200


def test_only_http_urls_are_accepted() -> None:
    with pytest.raises(ValueError, match="http"):
        KubeTransport("ftp://127.0.0.1", None, maxsize=1)
    with pytest.raises(ValueError, match="TLS"):
        KubeTransport("https://127.0.0.1", None, maxsize=1)


async def test_a_tls_connection_the_server_closes_while_idle_is_let_go(
    ca: trustme.CA, transports: list[KubeTransport]
) -> None:
    """The server's close_notify on an idle keep-alive connection (its keep-alive timeout)
    closes that connection; the next call opens a new one."""
    async with Server(lambda _: ok(), tls=server_tls(ca, "127.0.0.1")) as server:
        transport = transport_for(transports, server.url, client_tls(ca))
        assert (await get(transport))[0] == 200
        server.writers[0].close()  # a graceful TLS close: close_notify, then FIN
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not any(c is not None and c.closed for c in list(transport.pool._queue)):
            assert loop.time() < deadline, "the closed connection was never let go"
            await asyncio.sleep(0.01)  # polling a real connection, with a deadline
        async with asyncio.timeout(10):
            assert (await get(transport))[0] == 200
        assert server.connections == 2
