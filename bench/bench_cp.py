"""Benchmark of the CP token service (``cp-token serve``), run by hand; prints its results.

    .venv/bin/python bench/bench_cp.py [--conns 32] [--duration 5] [--cold-requests 1000]

1. Warm ``GET /token`` throughput against a bare Starlette endpoint. The CP runs as a process
   (``python -m cp_token serve``, TokenReview authn, jwt minter, rate limit out of the way)
   against the fake kube-apiserver; one valid pod-bound token is sent over and over, so after
   the first request every request is a review-cache hit and the cost measured is the CP's
   own: HTTP, bearer parsing, cache lookup, rate limit, policy, label cache, JWT signing
   (ES256), metrics and the audit line. The baseline is a one-route Starlette app under the
   same uvicorn (same loop, same HTTP parser, no access log). Measured with the default log
   level (the audit line is part of the real cost) and again with ``warning``.
2. Cold review cache at 5 ms of API latency, ``tokenreview`` against ``jwks``: every request
   carries a different valid bound token (distinct ``jti``), so every request misses the
   review cache; the fake kube-apiserver answers every route after 5 ms. Reports throughput,
   CP CPU per request and the Kubernetes API calls per 1,000 requests by route.

Honesty on a 2-core machine: the fake kube-apiserver runs in its own process (this script
with ``--fake-kube-child``, driven by JSON lines over a pipe) rather than in a thread of this
process, and the load generator is a third process using raw asyncio streams with keep-alive
HTTP/1.1 (no client library, so the client costs far less per request than the server). The
three still share two cores, so besides requests/s the bench reads each process's CPU time
(/proc) over the measured window: server CPU per request does not depend on who else is
competing for the cores, and the whole machine's busy time shows when another process
disturbed a run.

TCP_NODELAY: every listener (fake, CP, bare) is IPPROTO_TCP, so asyncio sets TCP_NODELAY on its
connections; without it each keep-alive response waited ~40 ms for a delayed ACK.
Every process is started here and stopped here by its pid.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
from common import PYTHON, ROOT, Proc, clean_env, fmt_ms, free_port, run_loadgen

API_LATENCY = 0.005
SPREAD_PODS = 100  # distinct session pods (and ServiceAccounts) behind the measured cold tokens
REPORTED_ROUTES = (
    "tokenreviews",
    "jwks",
    "openid-configuration",
    "pods",
    "serviceaccounts",
    "namespaces",
)


# --- the fake kube-apiserver in its own process -------------------------------------------


def fake_kube_child(workdir: str, signing_alg: str = "RS256") -> int:
    """Child process: run FakeKubeAPIServer with one managed session; obey JSON lines on stdin.

    Answers go to the original stdout, one JSON line per command; anything else printed goes
    to stderr (the parent's log file).
    """
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr
    sys.path.insert(0, str(ROOT))
    from tests.fakes.fixtures import (
        MANAGED_BY_LABEL,
        MANAGED_NS_LABEL,
        SESSION_NS,
        SESSION_POD,
        SESSION_SA,
        new_sessions,
    )
    from tests.fakes.kube_apiserver import ROUTES, FakeKubeAPIServer

    def answer(value: Any) -> None:
        answers.write(json.dumps(value) + "\n")

    with FakeKubeAPIServer(signing_alg=signing_alg) as kube:
        kube.add_namespace(SESSION_NS, labels=MANAGED_NS_LABEL)
        kube.add_service_account(SESSION_NS, SESSION_SA, labels=MANAGED_BY_LABEL)
        kube.add_pod(SESSION_NS, SESSION_POD, SESSION_SA)
        # the measured cold run spreads its tokens over this many session pods
        spread = [(f"session-b{i}-sa", f"runner-b{i}") for i in range(SPREAD_PODS)]
        for sa, pod in spread:
            kube.add_service_account(SESSION_NS, sa, labels=MANAGED_BY_LABEL)
            kube.add_pod(SESSION_NS, pod, sa)
        answer(str(kube.write_kubeconfig(Path(workdir) / "kubeconfig")))
        for raw in sys.stdin:
            cmd, arg = json.loads(raw)
            if cmd == "stop":
                answer("ok")
                break
            if cmd == "tokens":  # [path, n, spread]: n distinct pod-bound tokens, one per line
                path, n, spread_them = arg
                owners = spread if spread_them else [(SESSION_SA, SESSION_POD)]
                tokens = [
                    kube.issue_bound_token(SESSION_NS, *owners[i % len(owners)]) for i in range(n)
                ]
                Path(path).write_text("\n".join(tokens) + "\n")
                answer(len(set(tokens)))
            elif cmd == "latency":  # seconds, or [seconds, route]
                kube.set_latency(*(arg if isinstance(arg, list) else [arg]))
                answer("ok")
            elif cmd == "sessions":  # [path, n, prefix]: n new session pods, a token each
                path, n, prefix = arg
                Path(path).write_text("\n".join(new_sessions(kube, n, prefix)) + "\n")
                answer(n)
            elif cmd in ("deny", "allow"):  # [verb, group, resource] of the CP's own RBAC
                getattr(kube, cmd)(*arg)
                answer("ok")
            elif cmd == "reset":
                kube.reset_counts()
                answer("ok")
            elif cmd == "calls":
                answer({route: kube.calls(route) for route in sorted(ROUTES)})
            else:
                answer(f"unknown command {cmd!r}")
    return 0


class FakeKube:
    """Parent-side handle of the fake kube-apiserver, a child process driven by JSON lines."""

    def __init__(self, workdir: Path, signing_alg: str = "RS256") -> None:
        args = [PYTHON, str(Path(__file__)), "--fake-kube-child", str(workdir)]
        args += ["--fake-kube-alg", signing_alg]
        self._log = open(workdir / f"fake-kube-{signing_alg}.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=ROOT,
            env=clean_env({}),
        )
        try:
            self.kubeconfig = Path(self._read(60))
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        """The fake's process id."""
        return self.proc.pid

    def _read(self, timeout: float) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            log = (Path(self._log.name).read_text(errors="replace"))[-3000:]
            raise RuntimeError(f"fake kube-apiserver gave no answer in {timeout} s:\n{log}")
        return json.loads(line)

    def call(self, cmd: str, arg: Any = None, timeout: float = 120.0) -> Any:
        """Send one command, return its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([cmd, arg]) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def tokens(self, path: Path, n: int, spread: bool = False) -> Path:
        """Write ``n`` distinct valid pod-bound tokens to ``path`` (over SPREAD_PODS pods)."""
        distinct = self.call("tokens", [str(path), n, spread])
        if distinct != n:
            raise RuntimeError(f"asked for {n} distinct tokens, got {distinct}")
        return path

    def sessions(self, path: Path, n: int, prefix: str) -> Path:
        """``n`` new managed sessions (a ServiceAccount and a pod each, so ``n`` distinct
        identities) and a pod-bound token of each, one per line in ``path``."""
        made = self.call("sessions", [str(path), n, prefix], timeout=max(120.0, n / 200))
        if made != n:
            raise RuntimeError(f"asked for {n} sessions, got {made}")
        return path

    def stop(self) -> None:
        """Ask it to stop, then make sure by pid."""
        if self.proc.poll() is None:
            try:
                self.call("stop", timeout=10)
                self.proc.wait(10)
            except (OSError, ValueError, RuntimeError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._log.close()


# --- servers under test ---------------------------------------------------------------------


def start_cp(
    workdir: Path,
    name: str,
    kube: FakeKube,
    authn: str,
    log_level: str,
    extra: dict[str, str] | None = None,
) -> tuple[Proc, int]:
    """``python -m cp_token serve`` on loopback; (process, API port) once /readyz says 200.
    ``extra``: more variables (they win over the defaults here)."""
    port, mport = free_port(), free_port()
    env = {
        "CP_TOKEN_LISTEN_ADDR": f"127.0.0.1:{port}",
        "CP_TOKEN_METRICS_ADDR": f"127.0.0.1:{mport}",
        "CP_TOKEN_URL": f"http://127.0.0.1:{port}/token",
        "KUBECONFIG": str(kube.kubeconfig),
        "CP_TOKEN_AUTHN": authn,
        "CP_TOKEN_MINTER": "jwt",
        "CP_TOKEN_RATE_LIMIT": "100000/s,100000",
        "CP_TOKEN_LOG_LEVEL": log_level,
        **(extra or {}),
    }
    args = [PYTHON, "-m", "cp_token", "serve"]
    proc = Proc(name, args, env, workdir / f"{name}.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{mport}/readyz")
    except BaseException:
        proc.stop()
        raise
    return proc, port


def start_bare(workdir: Path) -> tuple[Proc, int]:
    """The bare Starlette baseline; (process, port) once ``GET /token`` answers."""
    port = free_port()
    args = [PYTHON, str(Path(__file__).with_name("common.py")), "bare", "--port", str(port)]
    proc = Proc("bare", args, {}, workdir / "bare.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/token")
    except BaseException:
        proc.stop()
        raise
    return proc, port


def warm_up(port: int, token: str, label: str) -> None:
    """One ``GET /token`` with ``token``: it must be a 200 (it fills the CP's caches)."""
    first = httpx.get(
        f"http://127.0.0.1:{port}/token",
        headers={"Authorization": f"Bearer {token}"},
        trust_env=False,
        timeout=15,
    )
    if first.status_code != 200:
        raise RuntimeError(f"{label}: the bench token got {first.status_code}: {first.text[:200]}")


def audit_lines(proc: Proc) -> int:
    """How many audit lines the CP wrote."""
    return proc.output().count('"event":"token_request"')


def check_ok(what: str, result: dict[str, Any], proc: Proc) -> None:
    """Every measured response must be a 200, else the numbers mean nothing."""
    bad = {s: n for s, n in result["statuses"].items() if s != "200"}
    if bad or not result["requests"]:
        tail = "\n".join(proc.output().splitlines()[-15:])
        raise RuntimeError(
            f"{what}: non-200 answers {bad} (errors {result['errors']}); log tail:\n{tail}"
        )


def per_req_us(cpu: float, requests: int) -> float:
    """CPU microseconds per request."""
    return cpu / requests * 1e6 if requests else float("nan")


# --- 1. warm /token against a bare endpoint -------------------------------------------------

WARM_RUNS = (
    # (label, log level); None = the bare baseline
    ("bare Starlette", None),
    ("CP, log info", "info"),
    ("CP, log warning", "warning"),
)


def bench_warm(
    kube: FakeKube, workdir: Path, conns: int, warmup: float, duration: float
) -> dict[str, dict[str, Any]]:
    """Warm-cache throughput (``conns`` connections) and serial latency (one connection)."""
    token_file = kube.tokens(workdir / "warm-token.txt", 1)
    token = token_file.read_text().strip()
    out: dict[str, dict[str, Any]] = {}
    for i, (label, level) in enumerate(WARM_RUNS):
        if level is None:
            proc, port = start_bare(workdir)
        else:
            proc, port = start_cp(workdir, f"cp-warm-{i}", kube, "tokenreview", level)
        try:
            if level is not None:  # one request first: the review and label caches fill
                warm_up(port, token, label)
            kube.call("reset")
            watch = [proc.pid, kube.pid]
            r = run_loadgen(
                port, token_file, conns=conns, warmup=warmup, duration=duration, watch=watch
            )
            check_ok(label, r, proc)
            r["kube_calls"] = kube.call("calls")
            serial = run_loadgen(port, token_file, conns=1, warmup=0.3, duration=1.5, watch=watch)
            check_ok(f"{label} serial", serial, proc)
            r["serial"] = serial
            r["server_cpu"] = r["cpu"][str(proc.pid)]
        finally:
            proc.stop()
        r["audit_lines"] = audit_lines(proc) if level is not None else None
        out[label] = r
        print(line(label, r, kube.pid))
    return out


# --- 2. cold review cache, 5 ms API latency: tokenreview vs jwks ------------------------------

COLD_RUNS = (
    # (label, authn)
    ("tokenreview", "tokenreview"),
    ("jwks", "jwks"),
)


def bench_cold(
    kube: FakeKube, workdir: Path, conns: int, requests: int, warm_requests: int
) -> dict[str, dict[str, Any]]:
    """Every request a distinct token (a review-cache miss), the API 5 ms away."""
    t0 = time.perf_counter()
    warm_file = kube.tokens(workdir / "cold-warmup.txt", warm_requests)
    run_file = kube.tokens(workdir / "cold-run.txt", requests, spread=True)
    if set(warm_file.read_text().split()) & set(run_file.read_text().split()):
        raise RuntimeError("warm-up and measured tokens overlap")
    took = time.perf_counter() - t0
    print(f"  minted {warm_requests + requests:,} distinct pod-bound tokens in {took:.1f} s")
    kube.call("latency", API_LATENCY)
    out: dict[str, dict[str, Any]] = {}
    try:
        for i, (label, authn) in enumerate(COLD_RUNS):
            cp, port = start_cp(workdir, f"cp-cold-{i}", kube, authn, "info")
            try:
                # Warm-up with other distinct tokens: the CP's pool of API connections, the
                # API server's JWKS (jwks mode), the namespace/SA/pod caches.
                w = run_loadgen(port, warm_file, conns=conns, each=True)
                check_ok(f"{label} warm-up", w, cp)
                kube.call("reset")
                watch = [cp.pid, kube.pid]
                r = run_loadgen(port, run_file, conns=conns, each=True, watch=watch)
                r["kube_calls"] = kube.call("calls")
                check_ok(label, r, cp)
                r["server_cpu"] = r["cpu"][str(cp.pid)]
            finally:
                cp.stop()
            out[label] = r
            print(line(label, r, kube.pid))
            print("    API calls per 1,000 requests: " + fmt_calls(calls_per_1000(r)))
    finally:
        kube.call("latency", 0.0)
    return out


# --- reporting ------------------------------------------------------------------------------


def line(name: str, r: dict[str, Any], kube_pid: int) -> str:
    """One row of a results table."""
    n, secs = r["requests"], r["elapsed"]
    client_cpu = r["cpu"][str(r["client_pid"])]
    kube_cpu = r["cpu"].get(str(kube_pid), 0.0)
    others = others_cpu(r)
    text = (
        f"  {name:<27} {r['rps']:>6,.0f} req/s  n={n:<6,} p50 {fmt_ms(r['p50']):>6} ms  "
        f"p99 {fmt_ms(r['p99']):>6} ms | server CPU {per_req_us(r['server_cpu'], n):>5.0f} us/req "
        f"({r['server_cpu'] / secs:.0%} core), client {client_cpu / secs:.0%}, "
        f"fake-kube {kube_cpu / secs:.0%}, other processes {others / secs:.0%}"
    )
    if "serial" in r:
        text += f"\n  {'':<27} 1 connection: p50 {fmt_ms(r['serial']['p50'])} ms"
    return text


def others_cpu(r: dict[str, Any]) -> float:
    """CPU seconds that processes other than ours used over the measured window."""
    return max(0.0, r["machine_cpu"] - sum(r["cpu"].values()))


def calls_per_1000(r: dict[str, Any]) -> dict[str, float]:
    """Kubernetes API calls per 1,000 requests, by route."""
    calls: dict[str, int] = r["kube_calls"]
    return {k: calls.get(k, 0) * 1000 / r["requests"] for k in REPORTED_ROUTES}


def fmt_calls(per: dict[str, float]) -> str:
    """``route n, ...``."""
    return ", ".join(f"{k} {v:g}" for k, v in per.items())


def summary(args: argparse.Namespace, env: str, warm: dict[str, Any], cold: dict[str, Any]) -> None:
    """The block to paste into an issue note."""

    def us(r: dict[str, Any]) -> float:
        return per_req_us(r["server_cpu"], r["requests"])

    bare = warm["bare Starlette"]
    print("\n" + "=" * 78)
    print("SUMMARY (bench/bench_cp.py)")
    print("=" * 78)
    print(f"env: {env}")
    print(
        f"load: separate process, raw asyncio keep-alive HTTP/1.1, {args.conns} connections; "
        "loopback; fake kube-apiserver in its own process (TCP_NODELAY set, like a real one)"
    )
    print(
        f"1. warm /token (review cache warm), {args.duration:g} s measured after "
        f"{args.warmup:g} s warm-up"
    )
    print(
        f"   {'':<27} {'req/s':>6}  {'p50 ms':>7} {'p99 ms':>7}  {'1-conn p50':>10}  "
        f"{'server CPU':>10}  {'vs bare':>7}"
    )
    for label, r in warm.items():
        print(
            f"   {label:<27} {r['rps']:>6,.0f}  {fmt_ms(r['p50']):>7} {fmt_ms(r['p99']):>7}  "
            f"{fmt_ms(r['serial']['p50']):>7} ms  {us(r):>6.0f} us  {r['rps'] / bare['rps']:>6.2f}x"
        )
    print(
        "   server CPU per request, CP/bare: "
        + ", ".join(
            f"{us(r) / us(bare):.2f}x ({k[4:]})" for k, r in warm.items() if k != "bare Starlette"
        )
    )
    print(
        f"2. cold review cache (a new token every request), API latency "
        f"{API_LATENCY * 1000:g} ms on every route, {args.cold_requests:,} requests"
    )
    for label, r in cold.items():
        print(
            f"   {label:<27} {r['rps']:>6,.0f} req/s  p50 {fmt_ms(r['p50'])} ms  "
            f"p99 {fmt_ms(r['p99'])} ms  CP CPU {us(r):.0f} us/req"
        )
    for label in ("tokenreview", "jwks"):
        print(f"   API calls per 1,000 requests, {label}: {fmt_calls(calls_per_1000(cold[label]))}")
    tr, jw = cold["tokenreview"], cold["jwks"]
    print(
        f"   jwks/tokenreview: throughput {jw['rps'] / tr['rps']:.2f}x; "
        f"CP CPU per request {us(jw) / us(tr):.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    """Run both benchmarks and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=32, help="concurrent connections")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm run: warm-up seconds")
    parser.add_argument("--duration", type=float, default=5.0, help="warm run: measured seconds")
    parser.add_argument("--cold-requests", type=int, default=1000, help="cold run: requests")
    parser.add_argument("--cold-warmup", type=int, default=64, help="cold run: warm-up requests")
    parser.add_argument("--fake-kube-child", metavar="WORKDIR", help=argparse.SUPPRESS)
    parser.add_argument("--fake-kube-alg", default="RS256", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fake_kube_child:
        return fake_kube_child(args.fake_kube_child, args.fake_kube_alg)
    started = time.perf_counter()
    env = (
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"uvicorn {version('uvicorn')} (asyncio loop), starlette {version('starlette')}, "
        f"httpx {version('httpx')}, httpcore {version('httpcore')}"
    )
    load_at_start = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"cp-token CP benchmark: {env}; load average {load_at_start}")
    print(f"load: {args.conns} keep-alive HTTP/1.1 connections from a separate process\n")
    with tempfile.TemporaryDirectory(prefix="bench-cp-") as tmp:
        workdir = Path(tmp)
        kube = FakeKube(workdir)
        try:
            print(f"1. warm /token ({args.warmup:g} s warm-up + {args.duration:g} s measured)")
            warm = bench_warm(kube, workdir, args.conns, args.warmup, args.duration)
            for label, r in warm.items():
                if r["audit_lines"] is not None:
                    active = {k: v for k, v in r["kube_calls"].items() if v}
                    print(
                        f"    {label}: {r['audit_lines']:,} audit lines written; "
                        f"API calls during the measured run: {active or 'none'}"
                    )
            print(
                f"\n2. cold review cache, API latency {API_LATENCY * 1000:g} ms, "
                f"{args.cold_requests:,} distinct tokens (after {args.cold_warmup} warm-up ones)"
            )
            cold = bench_cold(kube, workdir, args.conns, args.cold_requests, args.cold_warmup)
        finally:
            kube.stop()
    summary(args, env, warm, cold)
    runs = [*warm.values(), *cold.values()]
    noisiest = max(others_cpu(r) / r["elapsed"] for r in runs)
    print(
        f"machine: other processes used up to {noisiest:.0%} of a core during a measured run"
        f" (load average at start {load_at_start})"
        + ("  <-- NOT QUIET: rerun for clean numbers" if noisiest > 0.1 else "")
    )
    longest = max(r["elapsed"] for r in cold.values())
    print(
        "notes: server CPU is read from /proc over the measured window, so it does not depend "
        "on the 2 cores being shared\n"
        f"  with the load generator and the fake. Cold runs ({longest:.1f} s at most) spread "
        f"their tokens over {SPREAD_PODS} pods and ServiceAccounts\n"
        "  first seen in the run: object reads are per object per CP_TOKEN_LIVENESS_CACHE_TTL "
        "(10 s), not per request."
    )
    print(f"total bench time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
