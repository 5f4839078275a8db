"""Benchmark of the sidecar injector (``cp-token inject``), run by hand; prints its results.

    .venv/bin/python bench/bench_inject.py [--reviews 1000] [--rounds 3]

``POST /mutate`` latency (p50, p99, max) over ``--reviews`` AdmissionReviews over HTTPS,
against the bare Starlette endpoint of ``bench/common.py`` (``POST /mutate`` answering a
fixed review: same uvicorn, loop, HTTP parser and TLS certificate) with the same request
bytes, in alternating rounds. Every review is distinct (its own uid and pod name) and is a
realistic session pod that gets mutated (a runner, an MCP sidecar, an existing init
container, env and mounts), so the injector's whole path runs: read, parse, decide, build
the patch, encode, log, count.

Two connection patterns, as the API server may use either: one keep-alive connection
(sequential requests: latency without queueing), and a new TLS connection per review
(the handshake included). Server CPU per request is read from /proc, so a noisy neighbour
on the shared machine does not bias the ratio. The target of issue 10: p99 < 20 ms (the
API server allows a webhook at most ``timeoutSeconds``, 10 s here).

Every process is started here and stopped here by its pid.
"""

from __future__ import annotations

import argparse
import http.client
import json
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trustme
from common import HOST, PYTHON, ROOT, Proc, cpu_seconds, free_port

sys.path.insert(0, str(ROOT))
from tests.fakes.admission import admission_review, opted_in_pod

TARGET_P99 = 0.020


def review_bodies(count: int) -> list[bytes]:
    """``count`` distinct AdmissionReviews of a realistic opted-in session pod."""
    bodies = []
    for i in range(count):
        pod = opted_in_pod(
            name=f"session-{i}-runner",
            containers=[
                {
                    "name": "runner",
                    "image": "registry.example.com/runner:1.4",
                    "env": [{"name": f"VAR_{n}", "value": "x" * 20} for n in range(12)],
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                },
                {"name": "mcp", "image": "registry.example.com/mcp:2", "args": ["--port", "8002"]},
            ],
            initContainers=[{"name": "fetch-repo", "image": "alpine/git:2"}],
            volumes=[{"name": "work", "emptyDir": {}}],
        )
        pod["metadata"]["annotations"] = {"ambient-code.io/session": str(uuid.uuid4())}
        review = admission_review(pod, uid=str(uuid.uuid4()))
        bodies.append(json.dumps(review).encode())
    return bodies


def measure(port: int, ctx: ssl.SSLContext, bodies: list[bytes], *, reuse: bool) -> list[float]:
    """Seconds per POST /mutate, one request at a time; every answer must be a 200."""
    headers = {"Content-Type": "application/json"}
    times: list[float] = []
    conn: http.client.HTTPSConnection | None = None
    for body in bodies:
        t0 = time.perf_counter()
        if conn is None:
            conn = http.client.HTTPSConnection(HOST, port, context=ctx, timeout=10)
        conn.request("POST", "/mutate", body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        times.append(time.perf_counter() - t0)
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {data[:300]!r}")
        if not reuse:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()
    return times


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def run_round(
    proc: Proc, port: int, ctx: ssl.SSLContext, bodies: list[bytes], reuse: bool
) -> dict[str, Any]:
    cpu0 = cpu_seconds(proc.pid)
    times = measure(port, ctx, bodies, reuse=reuse)
    cpu = cpu_seconds(proc.pid) - cpu0
    return {
        "p50": pct(times, 0.50),
        "p99": pct(times, 0.99),
        "max": max(times),
        "cpu_us": cpu / len(times) * 1e6,
    }


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-inject-") as tmp:
        workdir = Path(tmp)
        ca = trustme.CA()
        leaf = ca.issue_cert(HOST)
        cert, key = workdir / "tls.crt", workdir / "tls.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        port, mport, bare_port = free_port(), free_port(), free_port()
        env = {
            "CP_TOKEN_INJECT_LISTEN_ADDR": f"{HOST}:{port}",
            "CP_TOKEN_METRICS_ADDR": f"{HOST}:{mport}",
            "CP_TOKEN_INJECT_TLS_CERT_FILE": str(cert),
            "CP_TOKEN_INJECT_TLS_KEY_FILE": str(key),
            "CP_TOKEN_INJECT_IMAGE": "registry.example.com/ambient/cp-token:1.0",
            "CP_TOKEN_INJECT_CP_URL": "https://cp-token.ambient-code.svc:8080/token",
        }
        common = str(Path(__file__).with_name("common.py"))
        bare_cmd = [PYTHON, common, "bare", "--port", str(bare_port)]
        bare_cmd += ["--tls-cert", str(cert), "--tls-key", str(key)]
        injector = Proc("inject", [PYTHON, "-m", "cp_token", "inject"], env, workdir / "inject.log")
        bare = Proc("bare", bare_cmd, {}, workdir / "bare.log")
        try:
            injector.wait_http(f"http://{HOST}:{mport}/readyz")
            bodies = review_bodies(args.reviews)
            warm = bodies[: min(100, len(bodies))]
            deadline = time.monotonic() + 30
            while True:  # the bare server has no probe: wait for its TLS port
                try:
                    measure(bare_port, ctx, warm[:1], reuse=True)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            measure(port, ctx, warm, reuse=True)  # warm-up (imports, caches)
            measure(bare_port, ctx, warm, reuse=True)
            results: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
            for mode, reuse in (("keep-alive", True), ("new connection", False)):
                results[mode] = [
                    (
                        run_round(bare, bare_port, ctx, bodies, reuse),
                        run_round(injector, port, ctx, bodies, reuse),
                    )
                    for _ in range(args.rounds)
                ]
            mutated = injector_count(mport)
        finally:
            code = injector.stop()
            bare.stop()

    mean_size = statistics.fmean(len(b) for b in bodies)
    print(
        f"cp-token inject POST /mutate over HTTPS: {args.reviews} distinct reviews per round "
        f"(mean {mean_size / 1024:.1f} KiB each), sequential, {args.rounds} alternating rounds"
    )
    worst = 0.0
    for mode, rounds in results.items():
        for i, (base, inj) in enumerate(rounds, 1):
            for name, r in (("bare Starlette", base), ("inject", inj)):
                print(
                    f"  {mode:14} round {i} {name:14} p50 {r['p50'] * 1000:6.2f} ms"
                    f"   p99 {r['p99'] * 1000:6.2f} ms   max {r['max'] * 1000:6.2f} ms"
                    f"   server CPU {r['cpu_us']:5.0f} us/req"
                )
        p50 = statistics.median(inj["p50"] for _, inj in rounds)
        p99 = statistics.median(inj["p99"] for _, inj in rounds)
        worst = max(worst, p99)
        cpu = statistics.median(inj["cpu_us"] / base["cpu_us"] for base, inj in rounds)
        lat = statistics.median(inj["p50"] / base["p50"] for base, inj in rounds)
        print(
            f"  {mode}: inject p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms (medians of "
            f"rounds); inject/bare p50 {lat:.2f}x, server CPU per request {cpu:.2f}x"
        )
    verdict = "met" if worst < TARGET_P99 else "MISSED"
    print(f"  target p99 < {TARGET_P99 * 1000:.0f} ms: {verdict}")
    print(f"  reviews mutated (injector metrics): {mutated:.0f}; exit code on SIGTERM: {code}")
    return 0 if worst < TARGET_P99 else 1


def injector_count(mport: int) -> float:
    conn = http.client.HTTPConnection(HOST, mport, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    line = 'cp_token_inject_requests_total{result="mutated"} '
    return float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/bench_inject.py")
    parser.add_argument("--reviews", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
