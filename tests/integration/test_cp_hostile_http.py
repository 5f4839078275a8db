"""`cp-token serve` as a real process under hostile HTTP (no credentials needed): oversized
and never-ending request heads, connections that send nothing, more connections than the
cap. The real defaults (64 KiB, 10 s) are used here; test_edge.py covers the same limits
fast with short ones injected.

Memory is read from /proc/<pid>/status: VmRSS before, VmHWM (the peak, reset first through
/proc/<pid>/clear_refs) after. The bound, 24 MiB of growth, is what the issue set for the
CP under a hostile stream; before these limits the same floods grew it by 64 and 389 MiB.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.integration.procs import Proc, cp_serve, run_cmd, write_identities

RUNNER = "system:serviceaccount:session-x:session-x-sa"
SA_TOKEN = "sa-hostile-3f9a"
RSS_GROWTH_BOUND_KIB = 24 * 1024
HEAD_START = b"GET /token HTTP/1.1\r\nHost: cp\r\nX-Flood: "


def status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match, text
    return int(match.group(1))


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux 4.0+: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@contextlib.contextmanager
def cp_process(tmp_path: Path, **env: str) -> Iterator[tuple[Proc, int]]:
    ids = write_identities(tmp_path / "ids.json", SA_TOKEN, RUNNER, "p")
    full = {
        "CP_TOKEN_AUTHN": "static",
        "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ids),
        "CP_TOKEN_MINTER": "static",
        "CP_TOKEN_STATIC_TOKEN": "issued-static-token",
        "CP_TOKEN_RATE_LIMIT": "1000/s,1000",
        **env,
    }
    proc, base, metrics = cp_serve(full, tmp_path / "cp.log")
    try:
        proc.wait_http(f"{metrics}/readyz")
        yield proc, int(base.rsplit(":", 1)[1])
    finally:
        code = proc.terminate()
    assert code == 0, proc.output()[-3000:]
    assert SA_TOKEN not in proc.output()


def token_request(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/token", headers={"Authorization": f"Bearer {SA_TOKEN}"})
    response = conn.getresponse()
    response.read()
    return response.status


def stream_head(port: int, total: int, chunk: int = 1 << 20) -> int:
    """Send one never-terminated head of up to ``total`` bytes; how many were accepted
    before the server refused or closed the connection."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(HEAD_START)
            block = b"a" * chunk
            while sent < total:
                sock.sendall(block)
                sent += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass
    return sent


def warm_up(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(20):
        assert token_request(conn) == 200
    conn.close()


def test_a_64_mib_header_is_refused_without_being_buffered(tmp_path: Path) -> None:
    with cp_process(tmp_path) as (proc, port):
        warm_up(port)
        before = status_kib(proc.pid, "VmRSS")
        reset_peak(proc.pid)
        sent = stream_head(port, 64 << 20)
        growth = status_kib(proc.pid, "VmHWM") - before
        print(f"64 MiB header: peak RSS growth {growth} KiB, client sent {sent >> 20} MiB")
        assert sent < 64 << 20, "the whole 64 MiB header was accepted"
        assert growth < RSS_GROWTH_BOUND_KIB
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert token_request(conn) == 200


def test_eight_connections_streaming_48_mib_of_header_stay_bounded(tmp_path: Path) -> None:
    with cp_process(tmp_path) as (proc, port):
        warm_up(port)
        before = status_kib(proc.pid, "VmRSS")
        reset_peak(proc.pid)
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda: results.append(stream_head(port, 6 << 20)))
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        growth = status_kib(proc.pid, "VmHWM") - before
        print(f"8 x 6 MiB of header: peak RSS growth {growth} KiB, sent {sum(results) >> 20} MiB")
        assert len(results) == 8 and all(sent < 6 << 20 for sent in results), results
        assert growth < RSS_GROWTH_BOUND_KIB


def test_no_complete_head_within_10_s_is_closed(tmp_path: Path) -> None:
    """The real default: a fresh connection that sends nothing and one with half a head."""
    with cp_process(tmp_path) as (_proc, port):
        empty = socket.create_connection(("127.0.0.1", port))
        half = socket.create_connection(("127.0.0.1", port))
        start = time.monotonic()
        half.sendall(b"GET /token HTTP/1.1\r\nHost: cp\r\n")
        closed: dict[str, float] = {}
        pending = {empty: "empty", half: "half head"}
        while pending and time.monotonic() - start < 20:
            readable, _, _ = select.select(list(pending), [], [], 0.2)
            for sock in readable:
                with contextlib.suppress(ConnectionError):
                    if sock.recv(4096):
                        continue
                closed[pending.pop(sock)] = time.monotonic() - start
                sock.close()
        print(f"closed after: {closed}")
        assert set(closed) == {"empty", "half head"}, closed
        assert all(9.0 <= seconds <= 12.0 for seconds in closed.values()), closed


def test_connections_beyond_the_cap_are_refused_at_once(tmp_path: Path) -> None:
    cap = 8
    with cp_process(tmp_path, CP_TOKEN_MAX_CONNECTIONS=str(cap)) as (proc, port):
        legit = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert token_request(legit) == 200  # a keep-alive connection, held open
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(cap - 1)]
        # the cap is reached: every further connection is closed at once
        start = time.monotonic()
        refusal_times = []
        for _ in range(20):
            t0 = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
                with contextlib.suppress(ConnectionError):
                    assert extra.recv(1) == b""
            refusal_times.append(time.monotonic() - t0)
        flood = 0
        while time.monotonic() - start < 2.0:  # a flood: the log must not follow it
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                flood += 1
        elapsed = time.monotonic() - start
        assert token_request(legit) == 200  # the held keep-alive connection still works
        open_fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        for sock in idle:
            sock.close()
        legit.close()
        deadline = time.monotonic() + 5
        while True:  # room again once the idle ones are gone
            try:
                fresh = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                assert token_request(fresh) == 200
                fresh.close()
                break
            except (ConnectionError, http.client.HTTPException, TimeoutError):
                assert time.monotonic() < deadline, "no room after the connections closed"
                time.sleep(0.05)
        print(
            f"cap {cap}: refused in max {max(refusal_times) * 1000:.1f} ms, "
            f"{flood} flood connections in {elapsed:.1f} s, {open_fds} fds open"
        )
        assert max(refusal_times) < 1.0, refusal_times
        assert open_fds < cap + 64, open_fds
    lines = [line for line in proc.output().splitlines() if "connection refused" in line]
    print(f"{len(lines)} 'connection refused' log lines for {flood + 20} refusals")
    assert 1 <= len(lines) <= elapsed + 2, len(lines)  # at most once a second
    assert any('"suppressed":' in line for line in lines), lines


def test_a_bad_cap_is_a_config_error() -> None:
    env = {
        "CP_TOKEN_URL": "http://127.0.0.1:1/token",
        "CP_TOKEN_LISTEN_ADDR": "127.0.0.1:0",
        "CP_TOKEN_METRICS_ADDR": "127.0.0.1:0",
        "CP_TOKEN_MINTER": "jwt",
        "CP_TOKEN_MAX_CONNECTIONS": "0",
    }
    result = run_cmd([sys.executable, "-m", "cp_token", "serve"], env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "CP_TOKEN_MAX_CONNECTIONS" in result.stderr
