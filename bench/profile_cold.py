"""CPU of one cold review, in-process: the authenticator the service builds, no HTTP server.

    .venv/bin/python bench/profile_cold.py [--authn tokenreview|jwks] [--requests 2000]
                                           [--latency 0.005] [--profile]
    .venv/bin/python bench/profile_cold.py --storm 1000 [--authn ...] [--conns 100]

The fake kube-apiserver runs in its own process (``bench_cp.FakeKube``); this process builds
the service with ``build_service`` (as ``cp-token serve`` does), then authenticates and
authorizes distinct valid tokens (spread over ``bench_cp.SPREAD_PODS`` pods) 32 at a time
through ``TokenDecision.decide`` and reports this process's CPU time per request (every
thread: the event loop and the Kubernetes workers). ``--profile`` adds cProfile's view of
the event loop thread.

``--storm N`` measures end to end instead: N new session pods (a new ServiceAccount and pod
each, so every request misses every cache but the namespace's) ask a ``cp-token serve``
process for their first token over HTTP, ``--conns`` at a time, against the fake API server
over HTTPS; reported: the time until all are served, the CP process's CPU per request, its
resident memory after the storm and the API calls per pod.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

from bench_cp import FakeKube, start_cp
from common import rss_kib, run_loadgen

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cp_token.decision import TokenAsk, TokenDecision, Trace  # noqa: E402
from cp_token.runtime.logs import setup_logging  # noqa: E402
from cp_token.settings.cp import load_settings  # noqa: E402
from cp_token.wiring import build_service  # noqa: E402

CONCURRENCY = 32


async def run(decision: TokenDecision, tokens: list[str]) -> None:
    """Decide every token, ``CONCURRENCY`` at a time; each must be issued."""
    queue = list(reversed(tokens))

    async def worker() -> None:
        while queue:
            token = queue.pop()
            await decision.decide(TokenAsk(credential=token), Trace(peer="127.0.0.1"))

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--authn", default="tokenreview", choices=("tokenreview", "jwks"))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.005)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--storm", type=int, default=0, help="N new pods end to end")
    parser.add_argument("--conns", type=int, default=100, help="storm: requests at a time")
    args = parser.parse_args()
    if args.storm:
        return storm(args)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        kube = FakeKube(workdir)
        try:
            warm = kube.tokens(workdir / "warm.txt", 64).read_text().split()
            cold = kube.tokens(workdir / "cold.txt", args.requests, spread=True).read_text().split()
            kube.call("latency", args.latency)
            took, cpu, stats = measure(args, kube.kubeconfig, warm, cold)
        finally:
            kube.stop()
    print(
        f"{args.authn}: {cpu / len(cold) * 1e6:.0f} us CPU per cold request "
        f"({len(cold) / took:.0f} req/s, {CONCURRENCY} at a time, API latency "
        f"{args.latency * 1000:g} ms)"
    )
    if stats is not None:
        stats.sort_stats("tottime").print_stats(35)
    return 0


def storm(args: argparse.Namespace) -> int:
    """``args.storm`` new pods ask a CP process for their first token, end to end."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        kube = FakeKube(workdir)
        try:
            warm = kube.tokens(workdir / "warm.txt", 64)
            pods = kube.sessions(workdir / "storm.txt", args.storm, "storm")
            kube.call("latency", args.latency)
            cp, port = start_cp(workdir, "cp-storm", kube, args.authn, "info")
            try:
                run_loadgen(port, warm, conns=min(args.conns, 64), each=True)
                kube.call("reset")
                r = run_loadgen(port, pods, conns=args.conns, each=True, watch=[cp.pid])
                calls = kube.call("calls")
                rss = rss_kib(cp.pid)
            finally:
                cp.stop()
        finally:
            kube.stop()
    cpu = r["cpu"][str(cp.pid)]
    n = r["requests"]
    per_pod = {k: round(v / n, 2) for k, v in calls.items() if v}
    print(
        f"{args.authn} storm: {n} new pods served in {r['elapsed']:.2f} s "
        f"({args.conns} at a time, API latency {args.latency * 1000:g} ms), statuses "
        f"{r['statuses']}, CP CPU {cpu / n * 1e6:.0f} us per pod, p99 {r['p99'] * 1000:.0f} ms, "
        f"RSS after {rss / 1024:.1f} MiB, API calls per pod {per_pod}"
    )
    return 0


def measure(
    args: argparse.Namespace, kubeconfig: Path, warm: list[str], cold: list[str]
) -> tuple[float, float, pstats.Stats | None]:
    """(seconds, CPU seconds, profile) for the cold tokens, after the warm-up ones."""
    env = {
        "KUBECONFIG": str(kubeconfig),
        "CP_TOKEN_URL": "http://127.0.0.1:8080/token",
        "CP_TOKEN_AUTHN": args.authn,
        "CP_TOKEN_MINTER": "jwt",
        "CP_TOKEN_RATE_LIMIT": "100000/s,100000",
    }
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    os.dup2(devnull, 2)  # the audit and start-up lines go nowhere
    try:
        setup_logging("info", "json")
        service = build_service(load_settings(env))
        decision = service.app.state.decision
        loop = asyncio.new_event_loop()
        loop.run_until_complete(run(decision, warm))
        profiler = cProfile.Profile(time.thread_time) if args.profile else None
        started, cpu = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        loop.run_until_complete(run(decision, cold))
        if profiler:
            profiler.disable()
        took, cpu = time.perf_counter() - started, time.process_time() - cpu
        loop.run_until_complete(service.authenticator.aclose())
        if service.kube is not None:
            loop.run_until_complete(service.kube.aclose())
        loop.close()
    finally:
        os.dup2(saved, 2)
    return took, cpu, pstats.Stats(profiler).strip_dirs() if profiler else None


if __name__ == "__main__":
    sys.exit(main())
