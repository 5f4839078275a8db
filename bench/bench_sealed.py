"""Sealed mode's cost, as ratios in one run: the same upstream called directly and through the
sidecar's egress route.

    .venv/bin/python bench/bench_sealed.py [--duration 5] [--rounds 2]

- throughput: GET over keep-alive connections for ``--duration`` seconds, direct (HTTPS to
  the upstream) and proxied (HTTP to the sealed sidecar, which calls the upstream over HTTPS
  with the token); goal: proxied at least 0.5x direct;
- latency: one connection, one request at a time; goal: p50 added by the sidecar at most 1 ms;
- the first server-sent event's extra delay through the sidecar (goal: at most 10 ms);
- resident memory: the plain sidecar, the sealed sidecar without the gRPC listener (goal: at
  most 35 MiB) and with it, each after its load.

The upstream is a bare Starlette app under uvicorn with TLS (the baseline of every bench), in
its own process; the load generator is its own process too (raw asyncio streams, TLS for the
direct calls), so the sidecar's CPU is measured, not the client's. Rounds alternate direct
and proxied; each figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import HOST, PYTHON, ROOT, Proc, clean_env, free_port, rss_kib

sys.path.insert(0, str(ROOT))
import grpc
import httpx
import trustme

from tests.integration.fake_cp import FakeCP
from tests.integration.sealed_rig import GRPC_SERVICE, GrpcUpstream

HEADER = "Ambient-Token-Request: true\r\n"
SSE_EVENTS = 3


# --- the upstream: a bare Starlette app over TLS ---------------------------------------------


def _upstream(port: int, cert: str, key: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def get(request: Request) -> JSONResponse:
        return JSONResponse({"id": "s-1", "state": "running", "items": [1, 2, 3]})

    async def sse(request: Request) -> StreamingResponse:
        async def events() -> Any:
            for i in range(SSE_EVENTS):
                if i:
                    await asyncio.sleep(0.01)
                yield f"data: event {i}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/get", get), Route("/v1/sse", sse)])
    uvicorn.run(
        app,
        host=HOST,
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        ssl_certfile=cert,
        ssl_keyfile=key,
    )


# --- the load generator ----------------------------------------------------------------------


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> int:
    writer.write(req)
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    i = head.find(b"\r\ncontent-length:")
    if i < 0:
        raise ValueError("response without content-length")
    j = head.find(b"\r\n", i + 2)
    await reader.readexactly(int(head[i + 17 : j]))
    return int(head[9:12])


async def _loadgen(args: argparse.Namespace) -> dict[str, Any]:
    context = None
    if args.ca:
        context = ssl.create_default_context(cafile=args.ca)
    extra = HEADER if args.guard else ""
    req = f"GET {args.path} HTTP/1.1\r\nHost: {HOST}:{args.port}\r\n{extra}\r\n".encode()
    conns = [await asyncio.open_connection(HOST, args.port, ssl=context) for _ in range(args.conns)]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    clock = time.perf_counter
    start_at = clock() + args.warmup
    until = start_at + args.duration

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            t0 = clock()
            if t0 >= until:
                return
            status = await _one(reader, writer, req)
            t1 = clock()
            if t0 >= start_at:
                latencies.append(t1 - t0)
                statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(worker(r, w) for r, w in conns))
    for _, writer in conns:
        writer.close()
    latencies.sort()
    return {
        "rps": len(latencies) / args.duration,
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[int(len(latencies) * 0.99)],
        "statuses": statuses,
    }


def loadgen(
    port: int, path: str, *, conns: int, duration: float, ca: str | None, guard: bool
) -> dict[str, Any]:
    args = [PYTHON, __file__, "loadgen", "--port", str(port), "--path", path]
    args += ["--conns", str(conns), "--duration", str(duration)]
    if ca:
        args += ["--ca", ca]
    if guard:
        args.append("--guard")
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=120, cwd=ROOT, env=clean_env({})
    )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen exited {done.returncode}:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    bad = {s: n for s, n in result["statuses"].items() if s != "200"}
    if bad:
        raise RuntimeError(f"non-200 answers: {bad}")
    return result


# --- the runs --------------------------------------------------------------------------------


def first_event(client: httpx.Client, url: str, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    first: float | None = None
    with client.stream("GET", url, headers=headers) as response:
        for line in response.iter_lines():  # read to the end: the connection is reused
            if first is None and line.startswith("data:"):
                first = time.perf_counter() - started
    assert first is not None, "no event"
    return first


def sse_extra_delay(direct: str, proxied: str, ca: str, token: str, n: int = 40) -> list[float]:
    """Median first-event delay, direct and proxied (alternating), in seconds."""
    context = ssl.create_default_context(cafile=ca)
    d: list[float] = []
    p: list[float] = []
    with (
        httpx.Client(verify=context, trust_env=False) as dc,
        httpx.Client(trust_env=False) as pc,
    ):
        for _ in range(n):
            d.append(first_event(dc, direct, {"Authorization": f"Bearer {token}"}))
            p.append(first_event(pc, proxied, {"Ambient-Token-Request": "true"}))
    return [statistics.median(d), statistics.median(p)]


def start_sidecar(name: str, cp: FakeCP, sa: Path, tmp: Path, **env: str) -> tuple[Proc, int]:
    port = free_port()
    full = {
        "AMBIENT_CP_TOKEN_URL": cp.url,
        "AMBIENT_SA_TOKEN_FILE": str(sa),
        "SIDECAR_LISTEN_ADDR": f"{HOST}:{port}",
        "SIDECAR_LOG_LEVEL": "warning",
        **env,
    }
    proc = Proc(name, [PYTHON, "-m", "sidecar"], full, tmp / f"{name}.log")
    proc.wait_http(f"http://{HOST}:{port}/readyz")
    return proc, port


def grpc_calls(port: int, n: int = 200) -> None:
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        unary = channel.unary_unary(f"/{GRPC_SERVICE}/Unary")
        for _ in range(n):
            unary(b"x", timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/bench_sealed.py")
    sub = parser.add_subparsers(dest="cmd")
    lg = sub.add_parser("loadgen")
    lg.add_argument("--port", type=int, required=True)
    lg.add_argument("--path", required=True)
    lg.add_argument("--conns", type=int, default=16)
    lg.add_argument("--duration", type=float, default=5.0)
    lg.add_argument("--warmup", type=float, default=1.0)
    lg.add_argument("--ca")
    lg.add_argument("--guard", action="store_true")
    up = sub.add_parser("upstream")
    up.add_argument("--port", type=int, required=True)
    up.add_argument("--cert", required=True)
    up.add_argument("--key", required=True)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--conns", type=int, default=16)
    args = parser.parse_args(argv)
    if args.cmd == "loadgen":
        print(json.dumps(asyncio.run(_loadgen(args))))
        return 0
    if args.cmd == "upstream":
        _upstream(args.port, args.cert, args.key)
        return 0
    return run(args)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-sealed-") as d:
        tmp = Path(d)
        ca = trustme.CA()
        leaf = ca.issue_cert(HOST, "localhost")
        cert, key, ca_file = tmp / "cert.pem", tmp / "key.pem", tmp / "ca.pem"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        grpc_upstream = GrpcUpstream()
        ca_file.write_bytes(ca.cert_pem.bytes() + grpc_upstream.ca_pem)
        sa = tmp / "sa"
        sa.write_text("sa-token")
        uport = free_port()
        upstream = Proc(
            "upstream",
            [
                PYTHON,
                __file__,
                "upstream",
                "--port",
                str(uport),
                "--cert",
                str(cert),
                "--key",
                str(key),
            ],
            {},
            tmp / "upstream.log",
        )
        procs = [upstream]
        try:
            with FakeCP(ttl=3600) as cp, grpc_upstream:
                upstream.wait_http(
                    f"https://{HOST}:{uport}/v1/get",
                    verify=ssl.create_default_context(cafile=str(ca_file)),
                )
                return _measure(args, tmp, cp, sa, uport, str(ca_file), grpc_upstream, procs)
        finally:
            for proc in procs:
                proc.stop()


def _measure(
    args: argparse.Namespace,
    tmp: Path,
    cp: FakeCP,
    sa: Path,
    uport: int,
    ca_file: str,
    grpc_upstream: GrpcUpstream,
    procs: list[Proc],
) -> int:
    upstreams = f"api=https://{HOST}:{uport}/v1"
    sealed, sport = start_sidecar(
        "sealed",
        cp,
        sa,
        tmp,
        SIDECAR_SEALED="true",
        SIDECAR_UPSTREAMS=upstreams,
        SIDECAR_UPSTREAM_CA_FILE=ca_file,
    )
    procs.append(sealed)
    rss_sealed_ready = rss_kib(sealed.pid)
    token = next(iter(cp.issued))
    rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in ("d", "p", "d1", "p1")}
    for _ in range(args.rounds):
        common = {"duration": args.duration}
        rounds["d"].append(
            loadgen(uport, "/v1/get", conns=args.conns, ca=ca_file, guard=False, **common)
        )
        rounds["p"].append(
            loadgen(sport, "/upstream/api/get", conns=args.conns, ca=None, guard=True, **common)
        )
        rounds["d1"].append(loadgen(uport, "/v1/get", conns=1, ca=ca_file, guard=False, **common))
        rounds["p1"].append(
            loadgen(sport, "/upstream/api/get", conns=1, ca=None, guard=True, **common)
        )
    direct_sse, proxied_sse = sse_extra_delay(
        f"https://{HOST}:{uport}/v1/sse", f"http://{HOST}:{sport}/upstream/api/sse", ca_file, token
    )
    rss_sealed = rss_kib(sealed.pid)
    sealed.stop()

    with_grpc, gport_sidecar = start_sidecar(
        "sealed-grpc",
        cp,
        sa,
        tmp,
        SIDECAR_SEALED="true",
        SIDECAR_UPSTREAMS=upstreams,
        SIDECAR_UPSTREAM_CA_FILE=ca_file,
        SIDECAR_GRPC_UPSTREAM=grpc_upstream.target,
        SIDECAR_GRPC_LISTEN_ADDR=f"{HOST}:{(glisten := free_port())}",
    )
    procs.append(with_grpc)
    rss_grpc_ready = rss_kib(with_grpc.pid)
    loadgen(gport_sidecar, "/upstream/api/get", conns=args.conns, duration=2, ca=None, guard=True)
    grpc_calls(glisten)
    rss_grpc = rss_kib(with_grpc.pid)
    with_grpc.stop()

    plain, pport = start_sidecar("plain", cp, sa, tmp)
    procs.append(plain)
    rss_plain_ready = rss_kib(plain.pid)
    _plain_load(pport)
    rss_plain = rss_kib(plain.pid)
    plain.stop()

    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in rounds[key])

    rps_ratio = med("p", "rps") / med("d", "rps")
    added_p50 = (med("p1", "p50") - med("d1", "p50")) * 1000
    sse_extra = (proxied_sse - direct_sse) * 1000
    mib = 1024.0
    load = os.getloadavg()[0]
    print(f"bench_sealed: {args.rounds} rounds of {args.duration:g} s, median; load {load:.1f}")
    print(
        f"  throughput, {args.conns} connections: direct {med('d', 'rps'):,.0f}/s, "
        f"proxied {med('p', 'rps'):,.0f}/s  -> {rps_ratio:.2f}x direct (goal >= 0.5x)"
    )
    print(
        f"  latency, one connection: p50 direct {med('d1', 'p50') * 1000:.2f} ms, proxied "
        f"{med('p1', 'p50') * 1000:.2f} ms -> +{added_p50:.2f} ms (goal <= 1 ms); p99 direct "
        f"{med('d1', 'p99') * 1000:.2f} ms, proxied {med('p1', 'p99') * 1000:.2f} ms"
    )
    print(
        f"  first SSE event: direct {direct_sse * 1000:.2f} ms, proxied "
        f"{proxied_sse * 1000:.2f} ms -> +{sse_extra:.2f} ms (goal <= 10 ms)"
    )
    print(
        f"  RSS: plain sidecar {rss_plain_ready / mib:.1f} MiB ready, {rss_plain / mib:.1f} MiB "
        f"after load; sealed {rss_sealed_ready / mib:.1f} -> {rss_sealed / mib:.1f} MiB "
        f"(goal <= 35); sealed with the gRPC listener {rss_grpc_ready / mib:.1f} -> "
        f"{rss_grpc / mib:.1f} MiB"
    )
    ok = rps_ratio >= 0.5 and added_p50 <= 1.0 and sse_extra <= 10 and rss_sealed <= 35 * 1024
    print("  goals:", "met" if ok else "NOT met")
    return 0


def _plain_load(port: int, n: int = 2000) -> None:
    with httpx.Client(base_url=f"http://{HOST}:{port}", trust_env=False) as client:
        for _ in range(n):
            client.get("/token", headers={"Ambient-Token-Request": "true"})


if __name__ == "__main__":
    sys.exit(main())
