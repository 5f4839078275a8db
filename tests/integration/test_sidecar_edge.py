"""`cp-token-sidecar` as a real process, spoken to over raw sockets: what an HTTP client
library will not send (two Host headers, an absolute-form target, an oversized head, an
endless trailer or chunk extension)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.integration.fake_cp import FakeCP
from tests.integration.hostile_rig import chunked_head, peak_growth_kib, stream_after
from tests.integration.procs import free_port, sidecar_serve

OPT_IN = b"Ambient-Token-Request: true\r\n"
SA_TOKEN = "sa-secret-7d1e"


def status_of(port: int, request: bytes) -> int:
    """Send ``request`` on a fresh connection; the response's status code."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, f"closed without an answer to {request[:60]!r}"
            head += chunk
    return int(head.split()[1])


@pytest.fixture
def sidecar_port(tmp_path: Path) -> object:
    sa = tmp_path / "sa"
    sa.write_text(SA_TOKEN)
    with FakeCP(ttl=900, sa_token=SA_TOKEN) as cp:
        proc, base = sidecar_serve(cp.url, sa, tmp_path / "sidecar.log")
        port = int(base.rsplit(":", 1)[1])
        try:
            proc.wait_http(f"http://127.0.0.1:{port}/readyz")
            yield port
        finally:
            assert proc.terminate() == 0, proc.output()
            assert SA_TOKEN not in proc.output()


def test_the_guard_over_a_real_socket(sidecar_port: int) -> None:
    port = sidecar_port
    plain = b"GET /token HTTP/1.1\r\nHost: 127.0.0.1\r\n" + OPT_IN + b"\r\n"
    assert status_of(port, plain) == 200
    # two Host headers: the last used to win
    two_hosts = b"GET /token HTTP/1.1\r\nHost: evil.example\r\nHost: 127.0.0.1\r\n" + OPT_IN
    assert status_of(port, two_hosts + b"\r\n") == 403
    # an absolute-form target (a proxy request) used to be served
    absolute = b"GET http://evil.example/token HTTP/1.1\r\nHost: 127.0.0.1\r\n" + OPT_IN
    assert status_of(port, absolute + b"\r\n") == 403
    absolute_loopback = b"GET http://127.0.0.1/token HTTP/1.1\r\nHost: 127.0.0.1\r\n" + OPT_IN
    assert status_of(port, absolute_loopback + b"\r\n") == 403
    # the edge limits apply to the sidecar too
    big = b"GET /token HTTP/1.1\r\nHost: 127.0.0.1\r\n" + OPT_IN + b"X: " + b"a" * 70_000
    assert status_of(port, big + b"\r\n\r\n") == 431
    assert status_of(port, plain) == 200


def test_both_ports_cut_endless_trailers_and_stalled_bodies(tmp_path: Path) -> None:
    """An endless trailer took a sidecar's probe port to 275 MiB (limit 128Mi): on the token
    port and the probe port it is cut, an endless chunk extension too, and a body that
    stalls is ended; the sidecar keeps serving."""
    sa = tmp_path / "sa"
    sa.write_text(SA_TOKEN)
    probe_port = free_port()
    with FakeCP(ttl=900, sa_token=SA_TOKEN) as cp:
        proc, base = sidecar_serve(
            cp.url, sa, tmp_path / "sidecar.log", SIDECAR_METRICS_ADDR=f"127.0.0.1:{probe_port}"
        )
        port = int(base.rsplit(":", 1)[1])
        try:
            proc.wait_http(f"http://127.0.0.1:{probe_port}/readyz")
            for where, target in (("token", port), ("probe", probe_port)):
                with peak_growth_kib(proc.pid) as growth:
                    trailer = stream_after(
                        target, chunked_head(b"/token") + b"0\r\nX-Endless: ", seconds=10
                    )
                    extension = stream_after(target, chunked_head(b"/readyz") + b"1;", seconds=10)
                print(
                    f"{where} port: trailer cut after {trailer.sent >> 10} KiB, extension after "
                    f"{extension.sent >> 10} KiB, peak RSS growth {growth[0]} KiB"
                )
                assert trailer.closed_after is not None and trailer.sent < 16 << 20
                assert extension.closed_after is not None and extension.sent < 16 << 20
                assert growth[0] < 16 * 1024
            plain = b"GET /token HTTP/1.1\r\nHost: 127.0.0.1\r\n" + OPT_IN + b"\r\n"
            assert status_of(port, plain) == 200
        finally:
            assert proc.terminate() == 0, proc.output()
