"""Shared bench helpers: loopback processes stopped by pid, CPU accounting, a load generator.

Run as a script it is one of the two helper processes the benches start:

- ``python bench/common.py loadgen ...``: an HTTP/1.1 keep-alive load generator on raw asyncio
  streams (no HTTP client library, so the client's own cost per request stays small) that
  prints one JSON line of results; ``GET`` with a Bearer token, or with ``--exchange`` a
  ``POST`` of an RFC 8693 token-exchange form;
- ``python bench/common.py bare --port N [--tls-cert F --tls-key F]``: the baseline, a bare
  Starlette app with a ``GET /token`` route returning a small JSON (a ``POST /oauth2/token``
  route that reads the body first, and ``POST /mutate`` answering a fixed AdmissionReview,
  the injector's reference), served by uvicorn with the CP's settings (no access log, no
  server header, same loop and HTTP implementation).

The benches measure the product as a black box, as processes; what they import of it is the
process helpers (:mod:`cp_token.runtime.processes`, shared with the tests and ``cp-token dev``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cp_token.runtime import processes
from cp_token.runtime.processes import LOOPBACK, clean_env, free_port

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
HOST = LOOPBACK
_CLK_TCK = os.sysconf("SC_CLK_TCK")

__all__ = [
    "HOST",
    "PYTHON",
    "ROOT",
    "Proc",
    "clean_env",
    "cpu_seconds",
    "fmt_ms",
    "free_port",
    "machine_busy_seconds",
    "run_loadgen",
]


# --- processes -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds consumed so far by process ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS`` from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (Linux /proc/stat), every process."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / _CLK_TCK  # user..steal; guest is already in user


class Proc(processes.Proc):
    """A process started by a bench (from the repository root), its output in a file; always
    stopped by its own pid (:meth:`stop`: SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log: Path) -> None:
        super().__init__(args, env, log, name=name, cwd=ROOT)


def fmt_ms(seconds: float | None) -> str:
    """Milliseconds with two decimals, or ``-``."""
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


# --- load generator ------------------------------------------------------------------------


_EXCHANGE_FORM = (
    "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"
    "&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt&subject_token="
)


def _request(host: str, port: int, path: str, token: str | None, exchange: bool = False) -> bytes:
    """``GET path`` with the token as Bearer, or (``exchange``) an RFC 8693 form POST."""
    if exchange:  # the token is base64url and dots: nothing to percent-encode
        body = f"{_EXCHANGE_FORM}{token or ''}".encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}\r\n".encode()


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes
) -> tuple[int, bool]:
    """Send one request, read one Content-Length response; (status, server closes)."""
    writer.write(req)
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    status = int(head[9:12])
    i = head.find(b"\r\ncontent-length:")
    if i < 0:
        raise ValueError("response without content-length")
    j = head.find(b"\r\n", i + 2)
    await reader.readexactly(int(head[i + 17 : j]))
    return status, b"\r\nconnection: close" in head


class _Load:
    """Workers over ``conns`` keep-alive connections; records (t_start, t_end, status)."""

    def __init__(self, host: str, port: int, conns: int, watch: list[int]) -> None:
        self.host, self.port, self.conns = host, port, conns
        self.watch = [*watch, os.getpid()]
        self.records: list[tuple[float, float, int]] = []
        self.errors: list[str] = []

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    def snapshot(self) -> tuple[float, dict[int, float]]:
        """(now, CPU seconds by watched pid; key 0: the whole machine's busy seconds)."""
        cpu = {pid: cpu_seconds(pid) for pid in self.watch}
        cpu[0] = machine_busy_seconds()
        return time.perf_counter(), cpu

    async def run_each(self, conns: list[Any], reqs: Iterator[bytes]) -> dict[str, Any]:
        """Send every request once over ``conns``; the summary of that run."""
        t_a, cpu_a = self.snapshot()
        await asyncio.gather(*(self.worker(c, reqs, None) for c in conns))
        t_b, cpu_b = self.snapshot()
        return _summary(self.records, t_a, t_b, cpu_a, cpu_b, self.errors)

    async def run_timed(
        self, conns: list[Any], req: bytes, warmup: float, duration: float
    ) -> dict[str, Any]:
        """The same request over and over: warm-up, then the summary of a measured window."""
        until = time.perf_counter() + warmup + duration
        marks: list[tuple[float, dict[int, float]]] = []

        async def mark() -> None:
            await asyncio.sleep(warmup)
            marks.append(self.snapshot())
            await asyncio.sleep(max(0.0, until - time.perf_counter()))
            marks.append(self.snapshot())

        forever = itertools.repeat(req)
        await asyncio.gather(mark(), *(self.worker(c, forever, until) for c in conns))
        (t_a, cpu_a), (t_b, cpu_b) = marks
        return _summary(self.records, t_a, t_b, cpu_a, cpu_b, self.errors)

    async def worker(
        self,
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        requests: Iterator[bytes],
        until: float | None,
    ) -> None:
        reader, writer = conn
        clock = time.perf_counter
        try:
            for req in requests:
                t0 = clock()
                if until is not None and t0 >= until:
                    break
                try:
                    status, closing = await _exchange(reader, writer, req)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    self.records.append((t0, clock(), 0))
                    if len(self.errors) < 5:
                        self.errors.append(repr(exc))
                    writer.close()
                    reader, writer = await self._connect()
                    continue
                self.records.append((t0, clock(), status))
                if closing:
                    writer.close()
                    reader, writer = await self._connect()
        finally:
            writer.close()


def _summary(
    records: list[tuple[float, float, int]],
    t_a: float,
    t_b: float,
    cpu_a: dict[int, float],
    cpu_b: dict[int, float],
    errors: list[str],
) -> dict[str, Any]:
    window = [r for r in records if t_a <= r[1] <= t_b]
    lat = sorted(r[1] - r[0] for r in window if r[0] >= t_a)
    statuses: dict[str, int] = {}
    for r in window:
        statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
    elapsed = t_b - t_a

    def pct(p: float) -> float | None:
        if not lat:
            return None
        return lat[min(len(lat) - 1, int(p * len(lat)))]

    return {
        "requests": len(window),
        "elapsed": elapsed,
        "rps": len(window) / elapsed if elapsed > 0 else 0.0,
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "mean": statistics.fmean(lat) if lat else None,
        "statuses": statuses,
        "errors": errors,
        "cpu": {str(pid): cpu_b[pid] - cpu_a[pid] for pid in cpu_a if pid},
        # every process on the machine: what is not ours is a noisy neighbour
        "machine_cpu": cpu_b[0] - cpu_a[0],
        "client_pid": os.getpid(),
    }


async def _loadgen(args: argparse.Namespace) -> dict[str, Any]:
    tokens = Path(args.tokens_file).read_text().split() if args.tokens_file else [""]
    load = _Load(args.host, args.port, args.conns, args.watch)
    conns = [await load._connect() for _ in range(args.conns)]
    if args.each:  # count mode: every token once, then stop
        reqs = [_request(args.host, args.port, args.path, t, args.exchange) for t in tokens]
        return await load.run_each(conns, iter(reqs))
    # timed mode: the same request over and over; warm-up, then a measured window
    req = _request(args.host, args.port, args.path, tokens[0], args.exchange)
    return await load.run_timed(conns, req, args.warmup, args.duration)


def run_loadgen(
    port: int,
    tokens_file: Path | None,
    *,
    conns: int,
    each: bool = False,
    warmup: float = 1.0,
    duration: float = 5.0,
    watch: Sequence[int] = (),
    path: str = "/token",
    timeout: float = 120.0,
    exchange: bool = False,
) -> dict[str, Any]:
    """Run the load generator as its own process; returns its result dict.

    ``each``: send every token of ``tokens_file`` once (count mode) and time the whole batch;
    else repeat the first token for ``warmup`` + ``duration`` seconds and measure the latter.
    ``watch``: pids whose CPU time over the measured window is reported (``cpu``).
    ``exchange``: POST each token as an RFC 8693 token-exchange form instead of a GET Bearer.
    """
    args = [PYTHON, str(Path(__file__)), "loadgen", "--port", str(port), "--path", path]
    if exchange:
        args.append("--exchange")
    args += ["--conns", str(conns), "--warmup", str(warmup), "--duration", str(duration)]
    if tokens_file is not None:
        args += ["--tokens-file", str(tokens_file)]
    if each:
        args.append("--each")
    for pid in watch:
        args += ["--watch", str(pid)]
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=clean_env({})
    )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen exited {done.returncode}:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- the bare baseline ---------------------------------------------------------------------


def _bare(port: int, tls_cert: str | None = None, tls_key: str | None = None) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def token(request: Request) -> JSONResponse:
        return JSONResponse({"token": "bare", "token_type": "Bearer", "expires_in": 900})

    async def exchange(request: Request) -> JSONResponse:  # reads the form body, nothing more
        await request.body()
        return JSONResponse({"access_token": "bare", "token_type": "Bearer", "expires_in": 900})

    async def mutate(request: Request) -> JSONResponse:  # the injector's reference
        await request.body()
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}
        return JSONResponse({**review, "response": {"uid": "bare", "allowed": True}})

    app = Starlette(
        routes=[
            Route("/token", token, methods=["GET"]),
            Route("/oauth2/token", exchange, methods=["POST"]),
            Route("/mutate", mutate, methods=["POST"]),
        ]
    )
    uvicorn.run(
        app,
        host=HOST,
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
    )


def main(argv: list[str] | None = None) -> int:
    """``loadgen`` or ``bare`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="bench/common.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    lg = sub.add_parser("loadgen")
    lg.add_argument("--host", default=HOST)
    lg.add_argument("--port", type=int, required=True)
    lg.add_argument("--path", default="/token")
    lg.add_argument("--conns", type=int, default=32)
    lg.add_argument("--warmup", type=float, default=1.0)
    lg.add_argument("--duration", type=float, default=5.0)
    lg.add_argument("--tokens-file")
    lg.add_argument("--each", action="store_true")
    lg.add_argument("--exchange", action="store_true", help="POST token-exchange forms")
    lg.add_argument("--watch", type=int, action="append", default=[])
    bare = sub.add_parser("bare")
    bare.add_argument("--port", type=int, required=True)
    bare.add_argument("--tls-cert")
    bare.add_argument("--tls-key")
    args = parser.parse_args(argv)
    if args.cmd == "bare":
        _bare(args.port, args.tls_cert, args.tls_key)
        return 0
    print(json.dumps(asyncio.run(_loadgen(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
