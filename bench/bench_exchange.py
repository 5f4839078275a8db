"""Benchmark: ``POST /oauth2/token`` (RFC 8693) against ``GET /token`` on the same CP, one run.

    .venv/bin/python bench/bench_exchange.py [--conns 32] [--duration 4] [--rounds 3]

One ``cp-token serve`` (TokenReview authn, jwt minter, rate limit out of the way, audit log
at info) against the fake kube-apiserver in its own process, as in bench_cp.py. One valid
pod-bound token is sent over and over, so after the first request every request is a
review-cache hit: what is measured is each door's own cost around the one shared decision
(GET: the Bearer header; POST: reading and parsing a form, the RFC 8693 checks). The two
doors alternate for ``--rounds`` rounds on the same process, and the medians are compared,
so drift of the machine hits both alike. Server CPU per request is read from /proc over each
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
from bench_cp import FakeKube, check_ok, line, others_cpu, per_req_us, start_cp
from common import fmt_ms, run_loadgen

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


def bench(
    kube: FakeKube, workdir: Path, conns: int, warmup: float, duration: float, rounds: int
) -> dict[str, list[dict[str, Any]]]:
    """Alternate the two doors ``rounds`` times on one CP; every run's result by door."""
    token_file = kube.tokens(workdir / "token.txt", 1)
    cp, port = start_cp(workdir, "cp-exchange", kube, "tokenreview", "info")
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in DOORS}
    try:
        first_requests(port, token_file.read_text().strip())
        for i in range(rounds):
            for label, path, exchange in DOORS:
                r = run_loadgen(
                    port,
                    token_file,
                    conns=conns,
                    warmup=warmup,
                    duration=duration,
                    watch=[cp.pid, kube.pid],
                    path=path,
                    exchange=exchange,
                )
                check_ok(label, r, cp)
                r["server_cpu"] = r["cpu"][str(cp.pid)]
                runs[label].append(r)
                print(line(f"{label} #{i + 1}", r, kube.pid))
    finally:
        cp.stop()
    return runs


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
            runs = bench(kube, workdir, args.conns, args.warmup, args.duration, args.rounds)
        finally:
            kube.stop()
    get, post = runs["GET /token"], runs["POST /oauth2/token"]
    print("\n" + "=" * 78)
    print("SUMMARY (bench/bench_exchange.py): warm review cache, same CP process, medians")
    print("=" * 78)
    for label, rs in runs.items():
        print(
            f"   {label:<20} {median_of(rs, 'rps'):>7,.0f} req/s  "
            f"p50 {fmt_ms(median_of(rs, 'p50'))} ms  p99 {fmt_ms(median_of(rs, 'p99'))} ms  "
            f"server CPU {median_of(rs, 'us'):.0f} us/req"
        )
    print(
        f"   POST/GET: throughput {median_of(post, 'rps') / median_of(get, 'rps'):.2f}x; "
        f"server CPU per request {median_of(post, 'us') / median_of(get, 'us'):.2f}x"
    )
    noisiest = max(others_cpu(r) / r["elapsed"] for r in [*get, *post])
    print(
        f"machine: other processes used up to {noisiest:.0%} of a core during a measured run"
        + ("  <-- NOT QUIET: rerun for clean numbers" if noisiest > 0.1 else "")
    )
    print(f"total bench time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
