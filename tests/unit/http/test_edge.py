"""The edge's connection caps at ``accept`` (real loopback sockets, no server): beyond a cap
the connection idle longest is closed to admit the new one, and with none idle the new one
is closed inside ``accept``; a closed connection stops counting. Plus the absolute-form flag
and the protocol classes. The limits on request bytes and time are exercised against real
servers in tests/integration/test_edge.py and, byte by byte, in test_framing.py."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from cp_token.http.edge import (
    EdgeLimits,
    EdgeListener,
    absolute_form,
    edge_protocol,
    is_edge_protocol,
)


@contextmanager
def listening(
    max_connections: int, max_per_client: int = 0, head_timeout: float | None = None
) -> Iterator[EdgeListener]:
    sock = EdgeListener(
        socket.AF_INET,
        max_connections=max_connections,
        limit_name="CP_TOKEN_MAX_CONNECTIONS",
        max_per_client=max_per_client,
    )
    sock.head_timeout = head_timeout
    with sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        yield sock


def connect(listener: EdgeListener) -> socket.socket:
    """A client connection, complete in the kernel's backlog (accept has not run yet)."""
    client = socket.create_connection(listener.getsockname(), timeout=5)
    return client


def closed_by_peer(client: socket.socket) -> bool:
    """True when the server side closed (EOF or reset); blocks at most the socket timeout."""
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True


def test_beyond_the_cap_with_none_idle_the_new_connection_is_closed_in_accept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with listening(max_connections=2) as listener:
        clients = [connect(listener) for _ in range(3)]
        try:
            first, _ = listener.accept()
            second, _ = listener.accept()
            assert listener.open_connections == 2
            with caplog.at_level(logging.WARNING), pytest.raises(BlockingIOError):
                listener.accept()  # the third is closed, then none is waiting
            assert listener.refused == 1 and listener.open_connections == 2
            assert closed_by_peer(clients[2])
            assert "2 connections" in caplog.text
            assert all(r.fields == {"limit": "CP_TOKEN_MAX_CONNECTIONS"} for r in caplog.records)  # type: ignore[attr-defined]
            first.close()  # a closed connection stops counting: room for one more
            assert listener.open_connections == 1
            clients.append(connect(listener))
            third, _ = listener.accept()
            assert listener.open_connections == 2
            third.close()
            second.close()
            assert listener.open_connections == 0
        finally:
            for client in clients:
                client.close()


def test_the_per_client_cap_counts_one_source_address() -> None:
    with listening(max_connections=10, max_per_client=1) as listener:
        clients = [connect(listener) for _ in range(2)]
        try:
            conn, addr = listener.accept()
            assert addr[0] == "127.0.0.1"
            with pytest.raises(BlockingIOError):
                listener.accept()
            assert listener.refused == 1 and listener.open_connections == 1
            assert closed_by_peer(clients[1])
            conn.close()
        finally:
            for client in clients:
                client.close()


async def test_at_the_cap_the_connection_idle_longest_is_closed_for_the_new_one() -> None:
    """With a head deadline, a connection that has not sent a head yet counts as idle."""
    with listening(max_connections=2, head_timeout=10.0) as listener:
        clients = [connect(listener) for _ in range(3)]
        try:
            oldest, _ = listener.accept()
            newer, _ = listener.accept()
            newest, _ = listener.accept()  # admitted: the oldest idle one makes room
            assert listener.evicted == 1 and listener.refused == 0
            assert listener.open_connections == 2
            await asyncio.to_thread(closed_by_peer, clients[0])  # shut down, not yet closed
            oldest.close()
            assert listener.open_connections == 2  # it had already stopped counting
            newer.close()
            newest.close()
            assert listener.open_connections == 0
        finally:
            for client in clients:
                client.close()


def test_absolute_form_is_read_from_our_record_or_from_the_raw_path() -> None:
    ours = {"extensions": {"cp_token.request_target": {"absolute_form": True}}, "raw_path": b"/"}
    assert absolute_form(ours)  # type: ignore[arg-type]
    assert not absolute_form({"raw_path": b"/token"})  # type: ignore[arg-type]
    assert absolute_form({"raw_path": b"http://evil.example/token"})  # type: ignore[arg-type]
    assert not absolute_form({})  # type: ignore[arg-type]


@pytest.mark.parametrize("implementation", ["h11", "httptools"])
def test_the_protocol_class_carries_its_limits_and_is_made_once(implementation: str) -> None:
    limits = EdgeLimits(max_head_bytes=1024)
    protocol = edge_protocol(limits, implementation)  # type: ignore[arg-type]
    assert protocol.limits is limits  # type: ignore[attr-defined]
    assert edge_protocol(limits, implementation) is protocol  # type: ignore[arg-type]
    assert edge_protocol(EdgeLimits(), implementation) is not protocol  # type: ignore[arg-type]
    assert is_edge_protocol(protocol)
    assert not is_edge_protocol("h11") and not is_edge_protocol(asyncio.Protocol)
