"""Benchmark: ``POST /oauth2/token`` (RFC 8693) against ``GET /token`` on the same CP, one run.

    .venv/bin/python bench/bench_exchange.py [--conns 32] [--duration 4] [--rounds 3]

One ``cp-token serve`` (TokenReview authn, jwt minter, rate limit out of the way, audit log
at info) against the fake kube-apiserver in its own process, as in bench_cp.py. One valid
pod-bound token is sent over and over, so after the first request every request is a
review-cache hit: what is measured is each door's own cost around the one shared decision
(GET: the Bearer header; POST: reading and parsing a form, the RFC 8693 checks). The two
doors alternate for ``--rounds`` rounds on the same process, and the medians are compared,
so drift of the machine hits both alike. The same pair is first measured on a bare Starlette
app (``GET /token`` vs a ``POST /oauth2/token`` that only reads its body): that is the floor
any POST pays in uvicorn and Starlette. Server CPU per request is read from /proc over each
measured window and does not depend on who else competes for the two cores.

The exchange should cost no more than form parsing over the GET path: the req/s ratio is
expected near 1 (below it by the size of the form parse).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
from bench_cp import FakeKube, check_ok, line, others_cpu, per_req_us, start_bare, start_cp
from common import Proc, fmt_ms, run_loadgen

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
DOORS = (
    # (label, path, exchange form)
    ("GET /token", "/token", False),
    ("POST /oauth2/token", "/oauth2/token", True),
)


def first_requests(port: int, token: str) -> None:
    """One request through each door: the caches fill, and both doors must answer 200."""
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(trust_env=False, timeout=15) as client:
        got = client.get(f"{base}/token", headers={"Authorization": f"Bearer {token}"})
        form = {"grant_type": GRANT, "subject_token": token, "subject_token_type": JWT_TYPE}
        exchanged = client.post(f"{base}/oauth2/token", data=form)
    for what, resp in (("GET /token", got), ("POST /oauth2/token", exchanged)):
        if resp.status_code != 200:
            raise RuntimeError(f"{what}: the bench token got {resp.status_code} {resp.text}")


def alternate(
    proc: Proc,
    port: int,
    token_file: Path,
    watch: list[int],
    args: argparse.Namespace,
    prefix: str,
    kube_pid: int,
) -> dict[str, list[dict[str, Any]]]:
    """The two doors, alternating for ``args.rounds`` rounds on one server process."""
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in DOORS}
    for i in range(args.rounds):
        for label, path, exchange in DOORS:
            r = run_loadgen(
                port,
                token_file,
                conns=args.conns,
                warmup=args.warmup,
                duration=args.duration,
                watch=watch,
                path=path,
                exchange=exchange,
            )
            check_ok(f"{prefix}{label}", r, proc)
            r["server_cpu"] = r["cpu"][str(proc.pid)]
            runs[label].append(r)
            print(line(f"{prefix}{label} #{i + 1}", r, kube_pid))
    return runs


def bench(
    kube: FakeKube, workdir: Path, args: argparse.Namespace
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Bare Starlette's two routes, then the CP's two doors; every run's result by door."""
    token_file = kube.tokens(workdir / "token.txt", 1)
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    bare, port = start_bare(workdir)
    try:
        out["bare"] = alternate(bare, port, token_file, [bare.pid], args, "bare ", kube.pid)
    finally:
        bare.stop()
    cp, port = start_cp(workdir, "cp-exchange", kube, "tokenreview", "info")
    try:
        first_requests(port, token_file.read_text().strip())
        out["cp"] = alternate(cp, port, token_file, [cp.pid, kube.pid], args, "CP ", kube.pid)
    finally:
        cp.stop()
    return out


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    """The median of one figure over the rounds."""
    if key == "us":
        return statistics.median(per_req_us(r["server_cpu"], r["requests"]) for r in runs)
    return statistics.median(float(r[key]) for r in runs)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=32, help="concurrent connections")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run")
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per door")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    env = (
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"uvicorn {version('uvicorn')}, starlette {version('starlette')}"
    )
    load_at_start = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"cp-token exchange benchmark: {env}; load average {load_at_start}")
    print(
        f"load: {args.conns} keep-alive HTTP/1.1 connections from a separate process; "
        f"{args.rounds} alternating rounds of {args.warmup:g} s warm-up + "
        f"{args.duration:g} s measured per door\n"
    )
    with tempfile.TemporaryDirectory(prefix="bench-exchange-") as tmp:
        workdir = Path(tmp)
        kube = FakeKube(workdir)
        try:
            results = bench(kube, workdir, args)
        finally:
            kube.stop()
    print("\n" + "=" * 78)
    print("SUMMARY (bench/bench_exchange.py): warm review cache, medians of alternating rounds")
    print("=" * 78)
    ratios = {}
    for server, runs in results.items():
        for label, rs in runs.items():
            print(
                f"   {server:<4} {label:<20} {median_of(rs, 'rps'):>7,.0f} req/s  "
                f"p50 {fmt_ms(median_of(rs, 'p50'))} ms  p99 {fmt_ms(median_of(rs, 'p99'))} ms  "
                f"server CPU {median_of(rs, 'us'):.0f} us/req"
            )
        get, post = runs["GET /token"], runs["POST /oauth2/token"]
        ratios[server] = (
            median_of(post, "rps") / median_of(get, "rps"),
            median_of(post, "us") / median_of(get, "us"),
            median_of(post, "us") - median_of(get, "us"),
        )
    for server, (rps, cpu, extra) in ratios.items():
        print(
            f"   {server:<4} POST/GET: throughput {rps:.2f}x; server CPU per request {cpu:.2f}x "
            f"({extra:+.0f} us)"
        )
    print(
        "   (bare: uvicorn + Starlette receiving a form body vs a GET, the floor for any POST; "
        "CP minus bare = the exchange's own parsing and checks)"
    )
    every = [r for runs in results.values() for rs in runs.values() for r in rs]
    noisiest = max(others_cpu(r) / r["elapsed"] for r in every)
    print(
        f"machine: other processes used up to {noisiest:.0%} of a core during a measured run"
        + ("  <-- NOT QUIET: rerun for clean numbers" if noisiest > 0.1 else "")
    )
    print(f"total bench time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
