"""Benchmark of the token sidecar (``cp-token-sidecar``), run by hand; prints its results.

    .venv/bin/python bench/bench_sidecar.py [--conns 16] [--warmup 1] [--duration 4] [--rounds 3]

1. ``GET /token`` requests/s of the sidecar (a process, holding a token from a fake CP that
   runs in a thread of this script and is idle during the measurement) against the bare
   Starlette endpoint of ``bench/common.py`` (same uvicorn, loop and HTTP parser), with
   the same request bytes (the ``Ambient-Token-Request`` header included) from a separate
   load-generator process on raw asyncio streams, in alternating rounds. Reports the median
   ratio of requests/s and of server CPU per request (read from /proc: fairer than requests/s
   on a shared 2-core machine, where the load generator competes for the cores).
2. The sidecar's resident memory (``VmRSS`` from /proc/PID/status) once ready, and after
   10,000 more ``GET /token`` requests.

Every process is started here and stopped here by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import HOST, PYTHON, ROOT, Proc, _Load, clean_env, free_port, rss_kib

sys.path.insert(0, str(ROOT))
from tests.integration.fake_cp import FakeCP

REQUEST = "GET /token HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAmbient-Token-Request: true\r\n\r\n"


# --- the load generator (its own process) -------------------------------------------------


async def _loadgen(args: argparse.Namespace) -> dict[str, Any]:
    load = _Load(HOST, args.port, args.conns, args.watch)
    req = REQUEST.format(port=args.port).encode()
    conns = [await load._connect() for _ in range(args.conns)]
    if args.count:
        return await load.run_each(conns, itertools.repeat(req, args.count))
    return await load.run_timed(conns, req, args.warmup, args.duration)


def loadgen(port: int, pid: int, args: argparse.Namespace, count: int = 0) -> dict[str, Any]:
    """Run the load generator as a separate process against ``port``; watch ``pid``'s CPU."""
    cmd = [PYTHON, __file__, "loadgen", "--port", str(port), "--watch", str(pid)]
    cmd += ["--conns", str(args.conns), "--warmup", str(args.warmup)]
    cmd += ["--duration", str(args.duration), "--count", str(count)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env({}))
    if done.returncode != 0:
        raise RuntimeError(f"loadgen exited {done.returncode}:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    bad = {s: n for s, n in result["statuses"].items() if s != "200"}
    if bad or not result["requests"]:
        raise RuntimeError(f"non-200 answers {bad}, errors {result['errors']}")
    result["cpu_us"] = result["cpu"][str(pid)] / result["requests"] * 1e6
    return result


# --- the bench -------------------------------------------------------------------------------


def start(name: str, args: list[str], env: dict[str, str], ready: str, workdir: Path) -> Proc:
    proc = Proc(name, args, env, workdir / f"{name}.log")
    try:
        proc.wait_http(ready)
    except BaseException:
        proc.stop()
        raise
    return proc


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-sidecar-") as tmp, FakeCP() as cp:
        workdir = Path(tmp)
        (workdir / "sa").write_text(cp.sa_token)
        bare_port, port = free_port(), free_port()
        common = str(Path(__file__).with_name("common.py"))
        bare_cmd = [PYTHON, common, "bare", "--port", str(bare_port)]
        env = {
            "AMBIENT_CP_TOKEN_URL": cp.url,
            "AMBIENT_SA_TOKEN_FILE": str(workdir / "sa"),
            "SIDECAR_LISTEN_ADDR": f"{HOST}:{port}",
        }
        sidecar_cmd = [PYTHON, "-m", "sidecar"]
        bare = start("bare", bare_cmd, {}, f"http://{HOST}:{bare_port}/token", workdir)
        try:
            sidecar = start("sidecar", sidecar_cmd, env, f"http://{HOST}:{port}/readyz", workdir)
        except BaseException:
            bare.stop()
            raise
        try:
            rss_ready = rss_kib(sidecar.pid)
            # Alternate the two servers round by round (both stay up; the idle one costs
            # nothing), so drift in a shared machine's load hits both alike.
            rounds = []
            for _ in range(args.rounds):
                rounds.append(
                    (loadgen(bare_port, bare.pid, args), loadgen(port, sidecar.pid, args))
                )
            rss_load = rss_kib(sidecar.pid)
            more = loadgen(port, sidecar.pid, args, count=10_000)
            rss_10k = rss_kib(sidecar.pid)
            bare_rss = rss_kib(bare.pid)
        finally:
            code = sidecar.stop()
            bare.stop()
        fetches = cp.calls

    print(
        f"sidecar GET /token, {args.conns} connections, {args.rounds} alternating rounds of "
        f"{args.duration:g} s"
    )
    for i, (base, side) in enumerate(rounds, 1):
        for name, r in (("bare Starlette", base), ("sidecar", side)):
            print(
                f"  round {i} {name:15} {r['rps']:7.0f} req/s   p50 {r['p50'] * 1000:5.2f} ms"
                f"   p99 {r['p99'] * 1000:5.2f} ms   server CPU {r['cpu_us']:4.0f} us/req"
            )
    rps = statistics.median(side["rps"] / base["rps"] for base, side in rounds)
    cpu = statistics.median(side["cpu_us"] / base["cpu_us"] for base, side in rounds)
    print(f"  ratio sidecar/bare requests/s (median of rounds): {rps:.2f}")
    print(f"  ratio sidecar/bare server CPU per request (median of rounds): {cpu:.2f}")
    print(f"  CP fetches during the whole bench: {fetches}")
    print("sidecar memory (VmRSS)")
    print(f"  ready: {rss_ready / 1024:.1f} MiB   after the timed load: {rss_load / 1024:.1f} MiB")
    print(
        f"  after 10,000 more requests ({more['requests']} answered 200): "
        f"{rss_10k / 1024:.1f} MiB (bare Starlette after its load: {bare_rss / 1024:.1f} MiB)"
    )
    print(f"  sidecar exit code on SIGTERM: {code}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/bench_sidecar.py")
    sub = parser.add_subparsers(dest="cmd")
    lg = sub.add_parser("loadgen")
    lg.add_argument("--port", type=int, required=True)
    lg.add_argument("--watch", type=int, action="append", default=[])
    for p in (parser, lg):
        p.add_argument("--conns", type=int, default=16)
        p.add_argument("--warmup", type=float, default=1.0)
        p.add_argument("--duration", type=float, default=4.0)
    lg.add_argument("--count", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.cmd == "loadgen":
        print(json.dumps(asyncio.run(_loadgen(args))))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
