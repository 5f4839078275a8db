"""A long run of the CP against the fake kube-apiserver, watching for what only time shows.

    .venv/bin/python bench/soak_cp.py [--cycles 8] [--authn tokenreview] [--load 20] [--idle 8]

Each cycle: ``--load`` seconds of warm ``GET /token`` (one token over and over, 32
connections), a batch of ``--cold`` distinct new tokens (review-cache misses, 5 ms of API
latency), then ``--idle`` seconds with no request at all: longer than the fake API server's
5 s keep-alive, so it closes the CP's idle TLS connections, as a real API server does. The
soak that found the kube transport spinning on such a close (a busy core and, under load,
339 MiB) is this one. After every cycle it reads the CP's resident memory and the CPU it used
while idle, and it fails (exit 1) when an idle CP uses more than ``IDLE_CPU_LIMIT`` of a core,
or its memory after the second cycle grows by more than ``RSS_GROWTH_LIMIT`` by the end.
Every process is started here and stopped by its pid.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench_cp import API_LATENCY, FakeKube, check_ok, start_cp
from common import cpu_seconds, rss_kib, run_loadgen

IDLE_CPU_LIMIT = 0.02  # of one core, while no request arrives
RSS_GROWTH_LIMIT_MIB = 8.0  # from the end of cycle 2 to the end of the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/soak_cp.py")
    parser.add_argument("--cycles", type=int, default=8)
    parser.add_argument("--authn", default="tokenreview", choices=("tokenreview", "jwks"))
    parser.add_argument("--load", type=float, default=20.0, help="warm seconds per cycle")
    parser.add_argument("--cold", type=int, default=2000, help="new tokens per cycle")
    parser.add_argument("--idle", type=float, default=8.0, help="quiet seconds per cycle")
    args = parser.parse_args(argv)
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        workdir = Path(tmp)
        kube = FakeKube(workdir)
        try:
            warm = kube.tokens(workdir / "warm.txt", 1)
            cold = [
                kube.tokens(workdir / f"cold-{i}.txt", args.cold, spread=True)
                for i in range(args.cycles)
            ]
            cp, port = start_cp(workdir, "cp-soak", kube, args.authn, "warning")
            try:
                print(
                    f"soak: {args.authn} authn, {args.cycles} cycles of {args.load:g} s warm, "
                    f"{args.cold:,} cold, {args.idle:g} s idle"
                )
                print(" cycle  warm req/s  cold req/s  idle CPU  RSS MiB")
                rss_after: list[float] = []
                for i in range(args.cycles):
                    kube.call("latency", 0.0)
                    w = run_loadgen(port, warm, conns=32, warmup=0.5, duration=args.load)
                    check_ok(f"cycle {i + 1} warm", w, cp)
                    kube.call("latency", API_LATENCY)
                    c = run_loadgen(port, cold[i], conns=32, each=True)
                    check_ok(f"cycle {i + 1} cold", c, cp)
                    before, t0 = cpu_seconds(cp.pid), time.monotonic()
                    time.sleep(args.idle)
                    idle = (cpu_seconds(cp.pid) - before) / (time.monotonic() - t0)
                    rss_after.append(rss_kib(cp.pid) / 1024)
                    print(
                        f" {i + 1:>5}  {w['rps']:>10,.0f}  {c['rps']:>10,.0f}  {idle:>8.1%}"
                        f"  {rss_after[-1]:>7.1f}",
                        flush=True,
                    )
                    if idle > IDLE_CPU_LIMIT:
                        failures.append(f"cycle {i + 1}: idle CPU {idle:.1%} of a core")
                if len(rss_after) > 2:
                    grown = rss_after[-1] - rss_after[1]
                    print(f"RSS from the end of cycle 2 to the end: {grown:+.1f} MiB")
                    if grown > RSS_GROWTH_LIMIT_MIB:
                        failures.append(f"RSS grew {grown:.1f} MiB after cycle 2")
            finally:
                cp.stop()
        finally:
            kube.stop()
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
