"""The Kubernetes client against a scripted loopback server: keep-alive, chunked bodies, stale
connections, deadlines, the pool bound, TLS verification, no proxy, no redirect, and every
malformed answer an API server (or something in its place) can send, which is always
KubeUnavailable and never grows memory."""

from __future__ import annotations

import asyncio
import ssl
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trustme

from cp_token.kube.client import (
    MAX_BODY_BYTES,
    KubeClient,
    KubeConnection,
    KubeDown,
    KubeError,
    KubeForbidden,
    KubeUnavailable,
)
from cp_token.runtime.clock import FakeClock
from tests.fakes import looptime
from tests.fakes.loop import run_until

# request head+body -> raw answer: bytes, None (never answer), or a callable that writes it
Answer = Callable[[bytes], Any]


CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"", status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-length: %d\r\n%s\r\n%s" % (status, len(body), extra, body)


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
            writer.transport.abort()

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
                if callable(raw):
                    await raw(writer)
                    return
                writer.write(raw)
                await writer.drain()
                if b"connection: close" in raw.lower():
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.close()


@pytest.fixture
async def clients() -> AsyncIterator[list[KubeClient]]:
    made: list[KubeClient] = []
    yield made
    for client in made:
        await client.aclose()


def client_for(
    made: list[KubeClient],
    url: str,
    tls: ssl.SSLContext | bool = True,
    maxsize: int = 4,
    timeout: float = 5.0,
    clock: FakeClock | None = None,
) -> KubeClient:
    client = KubeClient(
        KubeConnection(host=url, ssl_context=tls, token_provider=lambda: "cp-credential"),
        timeout=timeout,
        max_connections=maxsize,
        clock=clock or FakeClock(),
        rand=lambda: 0.5,
    )
    made.append(client)
    return client


async def get(client: KubeClient) -> dict[str, Any]:
    return await client.get_json("test", "/x")


async def test_one_connection_serves_every_sequential_call(clients: list[KubeClient]) -> None:
    async with Server(lambda _: ok()) as server:
        client = client_for(clients, server.url)
        for _ in range(5):
            assert await get(client) == {"ok": True}
        assert server.connections == 1 and len(server.requests) == 5


async def test_request_carries_path_prefix_host_credentials_and_body(
    clients: list[KubeClient],
) -> None:
    async with Server(lambda _: ok(b'{"status":{"authenticated":false}}')) as server:
        client = client_for(clients, server.url + "/prefix/")
        await client.token_review("sa-token", ("ambient-cp",))
        request = server.requests[0]
        assert request.startswith(b"POST /prefix/apis/authentication.k8s.io/v1/tokenreviews ")
        lower = request.lower()
        assert b"\r\nhost: 127.0.0.1:" in lower
        assert b"\r\nauthorization: bearer cp-credential\r\n" in lower
        assert b"\r\ncontent-type: application/json\r\n" in lower
        assert b"accept-encoding" not in lower  # no compression asked for
        assert request.endswith(b'"spec":{"token":"sa-token","audiences":["ambient-cp"]}}')


async def test_names_are_quoted_into_the_path(clients: list[KubeClient]) -> None:
    async with Server(lambda _: ok(b'{"metadata":{}}')) as server:
        await client_for(clients, server.url).get_pod("ns", "a/b?c")
        assert server.requests[0].startswith(b"GET /api/v1/namespaces/ns/pods/a%2Fb%3Fc ")


async def test_chunked_answers_are_decoded(clients: list[KubeClient]) -> None:
    chunked = (
        b'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{"a"\r\n3\r\n:1}\r\n0\r\n\r\n'
    )
    async with Server(lambda _: chunked) as server:
        assert await get(client_for(clients, server.url)) == {"a": 1}


async def test_connection_close_answers_are_not_reused(clients: list[KubeClient]) -> None:
    async with Server(lambda _: ok(extra=b"connection: close\r\n")) as server:
        client = client_for(clients, server.url)
        for _ in range(3):
            assert await get(client) == {"ok": True}
        assert server.connections == 3


async def test_a_connection_the_server_dropped_is_replaced(clients: list[KubeClient]) -> None:
    async with Server(lambda _: ok()) as server:
        client = client_for(clients, server.url)
        assert await get(client) == {"ok": True}
        server.writers[0].transport.abort()  # the server drops its idle keep-alive connection
        assert await get(client) == {"ok": True}
        assert server.connections == 2


async def test_the_deadline_covers_a_server_that_never_answers(
    clients: list[KubeClient],
) -> None:
    async with Server(lambda _: None) as server:
        clock = FakeClock()
        client = client_for(clients, server.url, timeout=0.3, clock=clock)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(KubeUnavailable, match="timed out"):
            await get(client)
        assert loop.time() - start < 1.0
        server.answer = lambda _: ok()
        clock.advance(1)  # past the backoff the timeout started
        assert await get(client) == {"ok": True}  # the hung connection was dropped


def test_the_deadline_covers_a_body_that_trickles() -> None:
    """A byte every 50 ms of loop time never ends the call's 0.3 s deadline early or late
    (loop time is virtual here: the deadline is checked exactly, in no wall-clock time)."""

    async def trickle(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n{")
        for _ in range(100):
            await looptime.advance(0.05)
            writer.write(b" ")

    async def main() -> float:
        made: list[KubeClient] = []
        async with Server(lambda _: trickle) as server:
            client = client_for(made, server.url, timeout=0.3)
            start = asyncio.get_running_loop().time()
            with pytest.raises(KubeUnavailable, match="timed out"):
                await get(client)
            elapsed = asyncio.get_running_loop().time() - start
        for client in made:
            await client.aclose()
        return elapsed

    assert 0.3 <= looptime.run(main()) < 0.35


async def test_calls_beyond_the_pool_share_its_connections(clients: list[KubeClient]) -> None:
    async with Server(lambda _: ok()) as server:
        client = client_for(clients, server.url, maxsize=2)
        results = await asyncio.gather(*(get(client) for _ in range(6)))
        assert results == [{"ok": True}] * 6
        assert server.connections <= 2


async def test_a_caller_that_gives_up_frees_its_connection(clients: list[KubeClient]) -> None:
    async with Server(lambda _: None) as server:
        client = client_for(clients, server.url, maxsize=1, timeout=60)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await get(client)
        server.answer = lambda _: ok()
        async with asyncio.timeout(5):  # the only connection slot was given back
            assert await get(client) == {"ok": True}


# --- bounds: a huge or endless body never grows memory -------------------------------------


async def test_a_declared_length_over_the_bound_is_refused_unread(
    clients: list[KubeClient],
) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1)
    async with Server(lambda _: head + b"{") as server:
        with pytest.raises(KubeUnavailable, match="over"):
            await get(client_for(clients, server.url))


async def test_an_endless_body_is_cut_at_the_bound(clients: list[KubeClient]) -> None:
    async def endless(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
        while not writer.is_closing():
            writer.write(chunk)
            await writer.drain()

    async with Server(lambda _: endless) as server:
        client = client_for(clients, server.url, timeout=30)
        tracemalloc.start()
        try:
            with pytest.raises(KubeUnavailable, match="over"):
                await get(client)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 3 * MAX_BODY_BYTES, peak


ENDLESS = {
    "header": b"HTTP/1.1 200 OK\r\nx-endless: ",
    "trailer": CHUNKED + b"2\r\n{}\r\n0\r\nx-endless: ",
    "chunk extension": CHUNKED + b"2;x=",
}


@pytest.mark.parametrize("part", sorted(ENDLESS))
async def test_an_endless_head_part_is_refused_in_bounded_memory(
    clients: list[KubeClient], part: str
) -> None:
    async def endless(writer: asyncio.StreamWriter) -> None:
        writer.write(ENDLESS[part])
        while not writer.is_closing():
            writer.write(b"a" * 65536)
            await writer.drain()

    async with Server(lambda _: endless) as server:
        client = client_for(clients, server.url, timeout=2)
        tracemalloc.start()
        try:
            with pytest.raises(KubeUnavailable):
                await get(client)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < MAX_BODY_BYTES, peak


# --- malformed answers: KubeUnavailable, never another exception -----------------------------

DEEP = b"[" * 200_000 + b"]" * 200_000
MALFORMED = {
    "not HTTP": b"NOT HTTP AT ALL\r\n\r\n",
    "status in superscript digits": "HTTP/1.1 ²⁰⁰ OK\r\ncontent-length: 2\r\n\r\n{}".encode(),
    "status of 4 digits": b"HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\n{}",
    "length in superscript digits": "HTTP/1.1 200 OK\r\ncontent-length: ²\r\n\r\n{}".encode(),
    "two lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
    "negative chunk size": CHUNKED + b"-1\r\n{}\r\n0\r\n\r\n",
    "chunk size of 400 digits": CHUNKED + b"9" * 400 + b"\r\n{}",
    "chunk size in superscript digits": CHUNKED + "²\r\n{}\r\n0\r\n\r\n".encode(),
    "body cut short": b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\nconnection: close\r\n\r\n{}",
    "JSON nested 200,000 deep": ok(b'{"a":' + DEEP + b"}"),
    "a number of 5,000 digits": ok(b'{"a":' + b"9" * 5000 + b"}"),
    "NaN": ok(b'{"a":NaN}'),
    "not JSON": ok(b"<html>"),
    "not UTF-8": ok(b'{"a":"\xff"}'),
    "not an object": ok(b"[1,2]"),
    "a redirect": ok(extra=b"location: https://elsewhere.example/\r\n", status=b"302 Found"),
    "a 500": ok(status=b"500 Internal Server Error"),
    "a gzip body never asked for": ok(b"\x1f\x8b\x08\x00", extra=b"content-encoding: gzip\r\n"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_a_malformed_answer_is_kube_unavailable(clients: list[KubeClient], case: str) -> None:
    async with Server(lambda _: MALFORMED[case]) as server:
        with pytest.raises(KubeUnavailable):
            await get(client_for(clients, server.url, timeout=3))


async def test_a_403_names_the_missing_permission_in_at_most_300_characters(
    clients: list[KubeClient],
) -> None:
    body = b'{"kind":"Status","message":"tokenreviews is forbidden: ' + b"x" * 1000 + b'"}'
    async with Server(lambda _: ok(body, status=b"403 Forbidden")) as server:
        with pytest.raises(KubeForbidden) as caught:
            await get(client_for(clients, server.url))
    assert "tokenreviews is forbidden" in caught.value.reason
    assert len(caught.value.reason) < 320


async def test_a_404_is_an_answer(clients: list[KubeClient]) -> None:
    async with Server(lambda _: ok(b'{"kind":"Status"}', status=b"404 Not Found")) as server:
        assert await client_for(clients, server.url).get_pod("ns", "gone") is None


async def test_nothing_listening_is_unreachable(clients: list[KubeClient]) -> None:
    async with Server(lambda _: ok()) as server:
        url = server.url
    with pytest.raises(KubeUnavailable, match="unreachable"):
        await get(client_for(clients, url))


async def test_proxy_variables_are_never_read(
    clients: list[KubeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Server(lambda _: ok()) as proxy, Server(lambda _: ok()) as server:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
            monkeypatch.setenv(name, proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert await get(client_for(clients, server.url)) == {"ok": True}
        assert proxy.connections == 0 and server.connections == 1


async def test_a_closed_client_refuses_new_calls(clients: list[KubeClient]) -> None:
    async with Server(lambda _: ok()) as server:
        client = client_for(clients, server.url)
        assert await get(client) == {"ok": True}
        await client.aclose()
        with pytest.raises(KubeUnavailable, match="closed"):
            await get(client)


# --- TLS ---------------------------------------------------------------------------------------


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


async def test_tls_keeps_one_verified_connection(ca: trustme.CA, clients: list[KubeClient]) -> None:
    async with Server(lambda _: ok(), tls=server_tls(ca, "127.0.0.1")) as server:
        client = client_for(clients, server.url, client_tls(ca))
        for _ in range(3):
            assert await get(client) == {"ok": True}
        assert server.connections == 1


async def test_tls_refuses_a_certificate_for_another_name(
    ca: trustme.CA, clients: list[KubeClient]
) -> None:
    async with Server(lambda _: ok(), tls=server_tls(ca, "other.example")) as server:
        with pytest.raises(KubeUnavailable):
            await get(client_for(clients, server.url, client_tls(ca)))


async def test_tls_refuses_an_unknown_ca(ca: trustme.CA, clients: list[KubeClient]) -> None:
    async with Server(lambda _: ok(), tls=server_tls(ca, "127.0.0.1")) as server:
        with pytest.raises(KubeUnavailable):
            await get(client_for(clients, server.url, True))


async def test_tls_without_verification_when_the_kubeconfig_says_so(
    ca: trustme.CA, clients: list[KubeClient]
) -> None:
    async with Server(lambda _: ok(), tls=server_tls(ca, "other.example")) as server:
        assert await get(client_for(clients, server.url, False)) == {"ok": True}


# --- one shared backoff while the API server is down -------------------------------------------


def status(code: bytes, extra: bytes = b"") -> bytes:
    return ok(b'{"kind":"Status"}', extra=extra, status=code)


async def test_concurrent_failures_count_as_one_and_hold_calls_back(
    clients: list[KubeClient],
) -> None:
    """Before: every request tried the API server (79 reads in 16 s for one caller)."""
    async with Server(lambda _: status(b"503 Service Unavailable")) as server:
        clock = FakeClock()
        client = client_for(clients, server.url, maxsize=10, clock=clock)
        results = await asyncio.gather(*(get(client) for _ in range(10)), return_exceptions=True)
        assert all(isinstance(r, KubeDown) for r in results)
        assert len(server.requests) == 10 and client._pacer.failures == 1
        wait = client.retry_wait()
        assert 0.5 <= wait <= 1.0  # one failure: full jitter over [0, 1 s], floor 0.5 s
        for _ in range(20):  # held back: answered at once, the API server sees none of them
            with pytest.raises(KubeDown) as held:
                await get(client)
            assert 0 < held.value.retry_after <= wait
        assert len(server.requests) == 10


async def test_after_the_wait_one_probe_finds_out_and_a_success_frees_every_call(
    clients: list[KubeClient],
) -> None:
    async with Server(lambda _: status(b"500 Internal Server Error")) as server:
        clock = FakeClock()
        client = client_for(clients, server.url, maxsize=10, clock=clock)
        with pytest.raises(KubeDown):
            await get(client)
        clock.advance(client.retry_wait())
        server.answer = lambda _: None  # the probe hangs ...
        probe = asyncio.create_task(get(client))
        await run_until(lambda: len(server.requests) == 2, "the probe on the wire")
        with pytest.raises(KubeDown, match="finding out"):
            await get(client)  # ... and nobody else calls meanwhile
        assert len(server.requests) == 2
        probe.cancel()
        server.answer = lambda _: ok()
        with pytest.raises(KubeDown):
            await get(client)  # the cancelled probe freed its turn: this one is the next
        assert len(server.requests) == 2  # ... but the backoff still holds
        await client.aclose()


async def test_a_success_ends_the_backoff(clients: list[KubeClient]) -> None:
    answers = [status(b"502 Bad Gateway"), ok()]
    async with Server(lambda _: answers.pop(0) if answers else ok()) as server:
        clock = FakeClock()
        client = client_for(clients, server.url, clock=clock)
        with pytest.raises(KubeDown):
            await get(client)
        clock.advance(client.retry_wait())
        assert await get(client) == {"ok": True}  # the probe succeeded
        assert client.retry_wait() == 0
        assert await asyncio.gather(*(get(client) for _ in range(5))) == [{"ok": True}] * 5
        assert len(server.requests) == 7


@pytest.mark.parametrize(
    ("header", "wait"),
    [(b"10", 10.0), (b"0", 0.0), (b"300", 30.0), (b"9" * 400, None), ("\u00b9".encode(), None)],
)
async def test_a_429_s_retry_after_is_waited_exactly_up_to_30_s(
    clients: list[KubeClient], header: bytes, wait: float | None
) -> None:
    """Before: ignored (a 429 was one more failure; retries came after 5 s whatever it said)."""
    extra = b"retry-after: " + header + b"\r\n"
    answers = [status(b"429 Too Many Requests", extra)]
    async with Server(lambda _: answers.pop(0) if answers else ok()) as server:
        clock = FakeClock()
        client = client_for(clients, server.url, clock=clock)
        with pytest.raises(KubeDown) as first:
            await get(client)
        if wait is None:  # not a usable number: the backoff decides (0.5-1 s after one)
            assert 0.5 <= first.value.retry_after <= 1.0
            return
        assert first.value.retry_after == wait
        if wait:
            clock.advance(wait - 0.1)
            with pytest.raises(KubeDown):
                await get(client)  # not a moment before
            clock.advance(0.1)
        assert await get(client) == {"ok": True}  # and no longer
        assert len(server.requests) == 2


async def test_a_retry_after_is_no_longer_than_it_says_after_earlier_failures(
    clients: list[KubeClient],
) -> None:
    answers = [status(b"503 Service Unavailable")] * 3
    answers.append(status(b"429 Too Many Requests", b"retry-after: 1\r\n"))
    async with Server(lambda _: answers.pop(0) if answers else ok()) as server:
        clock = FakeClock()
        client = client_for(clients, server.url, clock=clock)
        for _ in range(3):  # the backoff grows: 0.5, 1, 2 s (draws at the middle)
            with pytest.raises(KubeDown):
                await get(client)
            clock.advance(client.retry_wait())
        with pytest.raises(KubeDown) as caught:
            await get(client)
        assert caught.value.retry_after == 1.0  # not the 4 s the backoff would draw next
        clock.advance(1.0)
        assert await get(client) == {"ok": True}
        assert len(server.requests) == 5


async def test_an_answer_is_not_an_outage(clients: list[KubeClient]) -> None:
    """A 404, a 403 or a 401 is the API server answering: no backoff."""
    codes = [b"404 Not Found", b"403 Forbidden", b"401 Unauthorized", b"409 Conflict"]
    async with Server(lambda _: status(codes.pop(0)) if codes else ok()) as server:
        client = client_for(clients, server.url)
        assert await client.get_pod("ns", "gone") is None
        for _ in range(3):
            with pytest.raises(KubeError) as caught:
                await get(client)
            assert not isinstance(caught.value, KubeDown)
        assert client.retry_wait() == 0 and await get(client) == {"ok": True}
