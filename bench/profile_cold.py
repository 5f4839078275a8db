"""CPU of one cold review, in-process: the authenticator the service builds, no HTTP server.

    .venv/bin/python bench/profile_cold.py [--authn tokenreview|jwks] [--requests 2000]
                                           [--latency 0.005] [--profile]

The fake kube-apiserver runs in its own process (``bench_cp.FakeKube``); this process builds
the service with ``build_service`` (as ``cp-token serve`` does), then authenticates and
authorizes distinct valid tokens (spread over ``bench_cp.SPREAD_PODS`` pods) 32 at a time
through ``TokenDecision.decide`` and reports this process's CPU time per request (every
thread: the event loop and the Kubernetes workers). ``--profile`` adds cProfile's view of
the event loop thread.
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

from bench_cp import FakeKube

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
    args = parser.parse_args()
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
