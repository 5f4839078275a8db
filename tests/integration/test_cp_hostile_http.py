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

from tests.integration.hostile_rig import (
    chunked_head,
    idle_sockets,
    peak_growth_kib,
    stalled_bodies,
    status_of,
    stream_after,
)
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


METRICS_PORTS: dict[int, int] = {}


def proc_metrics_port(proc: Proc) -> int:
    return METRICS_PORTS[proc.pid]


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
    METRICS_PORTS[proc.pid] = int(metrics.rsplit(":", 1)[1])
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


def busy_connection(port: int) -> socket.socket:
    """A connection with a request in progress (a form body two bytes short): not idle, so
    never closed to make room for another. Returns once the CP reads that body (its
    ``100 Continue``)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /oauth2/token HTTP/1.1\r\nHost: cp\r\nExpect: 100-continue\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 5\r\n\r\nabc"
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 100 ")
    return sock


def test_connections_beyond_the_cap_are_refused_at_once_when_none_is_idle(
    tmp_path: Path,
) -> None:
    cap = 8
    with cp_process(tmp_path, CP_TOKEN_MAX_CONNECTIONS=str(cap)) as (proc, port):
        held = [busy_connection(port) for _ in range(cap)]
        # the cap is reached and no connection is idle: every further one is closed at once
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
        held[0].sendall(b"de")  # the held connections still work: this body is whole
        answer = held[0].recv(4096)
        assert status_of(answer) == 400, answer  # answered (the form lacks grant_type)
        open_fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 5
        while True:  # room again once the busy ones are gone
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


def legit_requests(port: int, count: int) -> int:
    """``count`` GET /token on new connections from 127.0.0.1; how many got a 200."""
    ok = 0
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        with contextlib.suppress(OSError, http.client.HTTPException):
            ok += token_request(conn) == 200
        conn.close()
    return ok


def test_one_address_holding_idle_sockets_does_not_shut_out_the_others(tmp_path: Path) -> None:
    """The red team's 4,096 idle sockets from one address (53 of 64 requests failed)."""
    with cp_process(tmp_path) as (proc, port):
        hog = idle_sockets(port, 4096, "127.0.0.2")
        ok = legit_requests(port, 64)
        open_fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        for sock in hog:
            sock.close()
        print(f"{len(hog)} idle sockets from 127.0.0.2: {ok}/64 served, {open_fds} fds open")
        assert ok == 64
        assert open_fds < 256 + 64 + 64, open_fds  # the per-client cap, not 4,096
    other = tmp_path / "no-per-client-cap"
    other.mkdir()
    with cp_process(other, CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT="0") as (
        _proc,
        port,
    ):  # no per-client cap (behind a proxy): the idle ones make room at the total cap
        hog = idle_sockets(port, 4096 + 100, "127.0.0.2")
        ok = legit_requests(port, 64)
        for sock in hog:
            sock.close()
        print(f"no per-client cap, {len(hog)} idle sockets: {ok}/64 served")
        assert ok == 64


def test_an_endless_trailer_or_chunk_extension_is_cut_on_both_ports(tmp_path: Path) -> None:
    """A chunked body with an endless trailer field took the CP from 65 to 414 MiB in 45 s;
    an endless chunk extension was accepted (29 GB in 30 s)."""
    with cp_process(tmp_path) as (proc, port):
        warm_up(port)
        metrics_port = proc_metrics_port(proc)
        for where, target in (("API", port), ("metrics", metrics_port)):
            with peak_growth_kib(proc.pid) as growth:
                trailer = stream_after(
                    target, chunked_head(b"/token") + b"0\r\nX-Endless: ", seconds=10
                )
                extension = stream_after(target, chunked_head(b"/metrics") + b"1;", seconds=10)
            print(
                f"{where} port: endless trailer cut after {trailer.sent >> 10} KiB, "
                f"chunk extension after {extension.sent >> 10} KiB; "
                f"peak RSS growth {growth[0]} KiB"
            )
            assert trailer.closed_after is not None and trailer.sent < 16 << 20
            assert extension.closed_after is not None and extension.sent < 16 << 20
            assert growth[0] < RSS_GROWTH_BOUND_KIB
        assert legit_requests(port, 3) == 3


def answer_to_a_new_body(port: int, within: float = 20.0) -> bytes:
    """Send new form heads (64 KiB announced) until one is answered at once (the CP reads
    the stalled bodies sent before at its own pace): that answer."""
    deadline = time.monotonic() + within
    while True:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as late:
            late.sendall(
                b"POST /oauth2/token HTTP/1.1\r\nHost: cp\r\nContent-Length: 65536\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
            )
            late.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                return late.recv(4096)
        assert time.monotonic() < deadline, "no new body was refused"


def test_bodies_that_stall_one_byte_short_stay_bounded(tmp_path: Path) -> None:
    """4,000 x 64 KB form bodies one byte short took the CP to 372 MiB: the bytes held are
    bounded (a new body beyond it is 503 at once), and a request without a body is served."""
    with cp_process(tmp_path, CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT="0") as (proc, port):
        warm_up(port)
        form = b"application/x-www-form-urlencoded"
        with peak_growth_kib(proc.pid) as growth:
            stalled = stalled_bodies(
                port, 1000, 64 * 1024, path=b"/oauth2/token", content_type=form
            )
            answer = answer_to_a_new_body(port)
            stalled += stalled_bodies(
                port, 3000, 64 * 1024, path=b"/oauth2/token", content_type=form
            )
            ok = legit_requests(port, 5)
        for sock in stalled:
            sock.close()
        print(f"4,000 x 64 KB stalled bodies: peak RSS growth {growth[0] >> 10} MiB")
        assert status_of(answer) == 503 and b"retry-after" in answer.lower()
        assert ok == 5
        assert growth[0] < 96 * 1024  # 306 MiB before the bound


def test_no_complete_head_or_body_within_10_s_is_closed(tmp_path: Path) -> None:
    """The real default: a fresh connection that sends nothing, one with half a head, one
    whose body stops one byte short."""
    with cp_process(tmp_path) as (_proc, port):
        empty = socket.create_connection(("127.0.0.1", port))
        half = socket.create_connection(("127.0.0.1", port))
        start = time.monotonic()
        half.sendall(b"GET /token HTTP/1.1\r\nHost: cp\r\n")
        stalled = busy_connection(port)
        closed: dict[str, float] = {}
        answers: dict[str, bytes] = {}
        pending = {empty: "empty", half: "half head", stalled: "body"}
        while pending and time.monotonic() - start < 20:
            readable, _, _ = select.select(list(pending), [], [], 0.2)
            for sock in readable:
                with contextlib.suppress(ConnectionError):
                    if data := sock.recv(4096):
                        answers[pending[sock]] = answers.get(pending[sock], b"") + data
                        continue
                closed[pending.pop(sock)] = time.monotonic() - start
                sock.close()
        print(f"closed after: {closed}")
        assert set(closed) == {"empty", "half head", "body"}, closed
        assert all(9.0 <= seconds <= 12.0 for seconds in closed.values()), closed
        assert status_of(answers["body"]) == 408 and "empty" not in answers


def test_a_bad_cap_is_a_config_error() -> None:
    env = {
        "CP_TOKEN_URL": "http://127.0.0.1:1/token",
        "CP_TOKEN_LISTEN_ADDR": "127.0.0.1:0",
        "CP_TOKEN_METRICS_ADDR": "127.0.0.1:0",
        "CP_TOKEN_MINTER": "jwt",
    }
    for name, value in (
        ("CP_TOKEN_MAX_CONNECTIONS", "0"),
        ("CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT", "-1"),
        ("CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT", "2.5"),
        ("CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT", "many"),
    ):
        result = run_cmd([sys.executable, "-m", "cp_token", "serve"], {**env, name: value})
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0 and name in result.stderr
