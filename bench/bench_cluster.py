"""The CP against a real kube-apiserver (the cluster tier's, built from its Go modules).

    .venv/bin/python bench/bench_cluster.py [--pods 1000] [--long-pods 200] [--minutes 10]
                                            [--ttl 120] [--part burst|long|both]

Burst: ``--pods`` sessions (namespaces of 10 sessions, labelled ServiceAccounts, pods: real
objects), a pod-bound TokenRequest token each, then every pod asks the CP at once (its own TLS
connection; a 503 or 429 is retried after its ``Retry-After``, as the sidecar does). Per authn
mode: the time until every pod holds a token, each pod's time to its token (p50/p99), the
Kubernetes API calls per pod (the CP's metrics, and the API server's audit log), the CP's and
the API server's CPU seconds, the 429s the CP saw, the pods' retries. Beside each, measured in
the same run just before it, the yardstick: the same number of TokenReviews sent straight to
the API server with the CP's identity, 64 at once (the CP's review slots), over keep-alive
connections, by a lean client (raw asyncio streams). Between runs the bench waits out the API
server's 10 s token cache, so no run rides on another's reviews. Goals: tokenreview within
1.2x of the yardstick, jwks faster.

Long run: ``--long-pods`` pods, each refreshing at half its token's lifetime (+-10 %, as the
sidecar does) from a CP per mode minting ``--ttl``-second tokens, for ``--minutes``: the API
calls per pod-hour (goal: at most 4) and each CP's resident memory slope after a warm-up.

Everything runs on loopback and is stopped by its pid. The machine is shared: compare the
ratios, and read the load average printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import trustme  # noqa: E402
from common import Proc, cpu_seconds, rss_kib  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from cp_token.runtime.processes import free_port  # noqa: E402
from tests.cluster.cluster import Cluster, build_tools  # noqa: E402
from tests.cluster.conftest import CP_USERNAME, install_control_plane  # noqa: E402
from tests.cluster.session import (  # noqa: E402
    CONTROL_PLANE,
    CP_AUDIENCE,
    CP_NAMESPACE,
    CP_SERVICE_ACCOUNT,
    MANAGED_NS,
    MANAGED_SA,
    CpServer,
    kube_calls,
)

MODES = ("tokenreview", "jwks")
SESSIONS_PER_NAMESPACE = 10
YARDSTICK_CONCURRENCY = 64  # CP_TOKEN_MAX_REVIEWS' default: the CP's review slots
TOKEN_CACHE = 10.0  # kube-apiserver's token success cache, waited out between runs
GOAL_RATIO = 1.2
GOAL_CALLS_PER_POD_HOUR = 4.0
BURST_DEADLINE = 300.0


# --- a lean HTTP/1.1 client on asyncio streams ------------------------------------------------


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, dict[str, str], bytes]:
    """Send one request; read one response (Content-Length or chunked)."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers: dict[str, str] = {}
    for line in head[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = b""
    return status, headers, body


async def _connect(
    url: str, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    return await asyncio.open_connection(
        parts.hostname, parts.port, ssl=ctx, server_hostname=parts.hostname
    )


def _get(url: str, path: str, token: str) -> bytes:
    host = urlsplit(url).netloc
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


def _review_request(url: str, caller: str, token: str) -> bytes:
    body = json.dumps(
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [CP_AUDIENCE]},
        }
    ).encode()
    head = (
        f"POST /apis/authentication.k8s.io/v1/tokenreviews HTTP/1.1\r\n"
        f"Host: {urlsplit(url).netloc}\r\nAuthorization: Bearer {caller}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# --- the cluster and its sessions --------------------------------------------------------------


@dataclass
class Bench:
    cluster: Cluster
    work: Path
    pki: trustme.CA
    signing_key: Path
    tokens: list[str] = field(default_factory=list)

    def start_cp(self, mode: str, extra: dict[str, str], tag: str) -> CpServer:
        work = self.work / f"cp-{tag}-{mode}"
        work.mkdir()
        env = {"CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT": "0", "CP_TOKEN_LOG_LEVEL": "warning"}
        return CpServer.start(
            self.cluster,
            self.pki,
            work,
            mode=mode,
            port=free_port(),
            signing_key=self.signing_key,
            extra={**env, **extra},
        )

    def apiserver_cpu(self) -> float:
        assert self.cluster.apiserver is not None
        return cpu_seconds(self.cluster.apiserver.pid)

    def audited_calls(self, since: float) -> int:
        """The CP's ServiceAccount's requests the API server received since ``since``."""
        n = 0
        for e in self.cluster.audit_events(CP_USERNAME):
            ts = e["requestReceivedTimestamp"].replace("Z", "+00:00")
            if _epoch(ts) >= since:
                n += 1
        return n


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def set_up(work: Path, pods: int) -> Bench:
    """The cluster with k8s/base, ``pods`` sessions and a pod-bound token each."""
    cluster = Cluster(build_tools(), work / "cluster")
    cluster.start()
    cluster.install_crds()
    install_control_plane(cluster)
    cluster.apply("-k", str(ROOT / "k8s" / "base"))
    key = ec.generate_private_key(ec.SECP256R1())
    signing_key = work / "signing.pem"
    signing_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    bench = Bench(cluster, work, trustme.CA(), signing_key)
    started = time.monotonic()
    first: list[dict[str, Any]] = []
    pods_list: list[dict[str, Any]] = []
    for i in range(pods):
        ns = f"bench-{i // SESSIONS_PER_NAMESPACE}"
        if i % SESSIONS_PER_NAMESPACE == 0:
            first.append(
                {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": ns, "labels": MANAGED_NS}}
            )  # fmt: skip
        sa = f"session-b{i}-sa"
        first.append(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": sa, "namespace": ns, "labels": MANAGED_SA},
                "automountServiceAccountToken": False,
            }
        )
        pods_list.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"runner-b{i}", "namespace": ns},
                "spec": {
                    "serviceAccountName": sa,
                    "automountServiceAccountToken": False,
                    "containers": [{"name": "runner", "image": "registry.example.com/runner:1"}],
                },
            }
        )
    as_list = lambda items: json.dumps({"apiVersion": "v1", "kind": "List", "items": items})  # noqa: E731
    cluster.apply("-f", "-", as_user=CONTROL_PLANE, stdin=as_list(first))
    cluster.apply("-f", "-", stdin=as_list(pods_list))

    def token(i: int) -> str:
        ns = f"bench-{i // SESSIONS_PER_NAMESPACE}"
        resp = cluster.request(
            "POST",
            f"/api/v1/namespaces/{ns}/serviceaccounts/session-b{i}-sa/token",
            body={
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "audiences": [CP_AUDIENCE],
                    "expirationSeconds": 7200,
                    "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": f"runner-b{i}"},
                },
            },
        )
        if resp.status_code != 201:
            raise RuntimeError(f"TokenRequest {i}: {resp.status_code} {resp.text[:300]}")
        value: str = resp.json()["status"]["token"]
        return value

    with ThreadPoolExecutor(8) as pool:
        bench.tokens = list(pool.map(token, range(pods)))
    print(
        f"set-up: {pods} sessions in {pods // SESSIONS_PER_NAMESPACE} namespaces, a TokenRequest "
        f"each, in {time.monotonic() - started:.1f} s"
    )
    return bench


# --- burst ----------------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def _yardstick(
    url: str, ctx: ssl.SSLContext, caller: str, tokens: list[str]
) -> dict[str, Any]:
    queue = list(reversed(tokens))
    statuses: dict[int, int] = {}
    latencies: list[float] = []

    async def worker() -> None:
        reader, writer = await _connect(url, ctx)
        try:
            while queue:
                token = queue.pop()
                t0 = time.perf_counter()
                status, _, body = await _exchange(
                    reader, writer, _review_request(url, caller, token)
                )
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 201 and not json.loads(body)["status"].get("authenticated"):
                    raise RuntimeError("a yardstick review did not authenticate")
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(YARDSTICK_CONCURRENCY)))
    return {"wall": time.perf_counter() - t0, "statuses": statuses, "latencies": latencies}


def yardstick(bench: Bench, caller: str, tokens: list[str]) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(bench.cluster.ca_file))
    cpu0 = bench.apiserver_cpu()
    out = asyncio.run(_yardstick(bench.cluster.url, ctx, caller, tokens))
    out["apiserver_cpu"] = bench.apiserver_cpu() - cpu0
    return out


async def _pods_ask(base: str, ca_file: Path, tokens: list[str]) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    start = time.perf_counter()
    done: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []

    async def pod(token: str) -> None:
        while time.perf_counter() - start < BURST_DEADLINE:
            try:
                reader, writer = await _connect(base, ctx)
                try:
                    status, headers, _ = await _exchange(
                        reader, writer, _get(base, "/token", token)
                    )
                finally:
                    writer.close()
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                if len(errors) < 5:
                    errors.append(repr(exc))
                statuses[0] = statuses.get(0, 0) + 1
                await asyncio.sleep(1)
                continue
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                done.append(time.perf_counter() - start)
                return
            if status not in (429, 503):
                errors.append(f"{status}")
                return
            await asyncio.sleep(float(headers.get("retry-after", "1")))

    await asyncio.gather(*(pod(t) for t in tokens))
    return {
        "wall": max(done) if done else None,
        "done": done,
        "statuses": statuses,
        "errors": errors,
    }


def burst(bench: Bench, mode: str, tokens: list[str]) -> dict[str, Any]:
    cp = bench.start_cp(mode, {}, "burst")
    try:
        cpu0, api0 = cpu_seconds(cp.proc.pid), bench.apiserver_cpu()
        calls0 = sum(cp.kube_calls().values())
        since = time.time()
        out = asyncio.run(_pods_ask(cp.base, cp.ca_file, tokens))
        out["cp_cpu"] = cpu_seconds(cp.proc.pid) - cpu0
        out["apiserver_cpu"] = bench.apiserver_cpu() - api0
        kube = cp.kube_calls()
        out["calls"] = sum(kube.values()) - calls0
        out["audited"] = bench.audited_calls(since)
        out["seen_429"] = sum(n for (_, result), n in kube.items() if result == "429")
        out["by_call"] = {f"{c} {r}": n for (c, r), n in sorted(kube.items())}
    finally:
        cp.stop()
    return out


def bare(bench: Bench, tokens: list[str]) -> dict[str, Any]:
    """The same burst against a bare Starlette endpoint over TLS (bench/common.py bare): what
    N new TLS connections to a Python server cost before any decision."""
    work = bench.work / "bare"
    work.mkdir()
    leaf = bench.pki.issue_cert("127.0.0.1")
    cert, key = work / "tls.crt", work / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca_file = work / "ca.crt"
    bench.pki.cert_pem.write_to_path(str(ca_file))
    port = free_port()
    args = [sys.executable, str(ROOT / "bench" / "common.py"), "bare", "--port", str(port)]
    proc = Proc("bare", [*args, "--tls-cert", str(cert), "--tls-key", str(key)], {}, work / "log")
    try:
        proc.wait_http(
            f"https://127.0.0.1:{port}/token",
            verify=ssl.create_default_context(cafile=str(ca_file)),
        )
        cpu0 = cpu_seconds(proc.pid)
        out = asyncio.run(_pods_ask(f"https://127.0.0.1:{port}", ca_file, tokens))
        out["cpu"] = cpu_seconds(proc.pid) - cpu0
    finally:
        proc.stop()
    return out


def run_burst(bench: Bench, n: int) -> list[str]:
    tokens = bench.tokens[:n]
    base = bare(bench, tokens)
    caller = bench.cluster.create_token(CP_NAMESPACE, CP_SERVICE_ACCOUNT)
    rows = []
    summary = []
    for mode in MODES:
        time.sleep(TOKEN_CACHE + 1)
        yard = yardstick(bench, caller, tokens)
        time.sleep(TOKEN_CACHE + 1)
        got = burst(bench, mode, tokens)
        if got["wall"] is None or len(got["done"]) != n:
            raise RuntimeError(f"{mode}: {len(got['done'])} of {n} pods got a token: {got}")
        ratio = got["wall"] / yard["wall"]
        vs_bare = got["wall"] / base["wall"]
        retries = sum(got["statuses"].values()) - n
        rows.append(
            f" {'yardstick: the API server alone':<34} {yard['wall']:8.2f} "
            f"{pct(yard['latencies'], 0.5) * 1000:8.1f} "
            f"{pct(yard['latencies'], 0.99) * 1000:8.1f} {1:9.2f} {'-':>8} "
            f"{yard['apiserver_cpu']:8.2f} {yard['statuses'].get(429, 0):6d} {'-':>7}"
        )
        rows.append(
            f" {mode + ' CP':<34} {got['wall']:8.2f} {pct(got['done'], 0.5) * 1000:8.1f} "
            f"{pct(got['done'], 0.99) * 1000:8.1f} {got['calls'] / n:9.2f} {got['cp_cpu']:8.2f} "
            f"{got['apiserver_cpu']:8.2f} {got['seen_429']:6.0f} {retries:7d}"
        )
        goal = f"goal <= {GOAL_RATIO}" if mode == "tokenreview" else "goal < 1"
        summary.append(
            f" {mode}: {ratio:.2f}x the yardstick ({goal}), {vs_bare:.2f}x the bare endpoint, "
            f"CP CPU {got['cp_cpu'] / n * 1000:.2f} ms per pod (bare "
            f"{base['cpu'] / n * 1000:.2f}); API calls per pod "
            f"{got['calls'] / n:.2f} (audit log {got['audited'] / n:.2f}); by call "
            f"{got['by_call']}"
        )
        if got["errors"]:
            summary.append(f"   errors: {got['errors']}")
    print(
        f"\nburst: {n:,} pods ask at once (load average {os.getloadavg()[0]:.1f}); the "
        f"yardstick: {n:,} TokenReviews straight to the API server, {YARDSTICK_CONCURRENCY} at once"
    )
    print(
        f" {'':<34} {'wall s':>8} {'p50 ms':>8} {'p99 ms':>8} {'calls/pod':>9} "
        f"{'CP cpu':>8} {'API cpu':>8} {'429s':>6} {'retries':>7}"
    )
    print(
        f" {'bare Starlette endpoint (TLS)':<34} {base['wall']:8.2f} "
        f"{pct(base['done'], 0.5) * 1000:8.1f} {pct(base['done'], 0.99) * 1000:8.1f} "
        f"{0:9.2f} {base['cpu']:8.2f} {'-':>8} {'-':>6} {sum(base['statuses'].values()) - n:7d}"
    )
    for row in rows:
        print(row)
    for line in summary:
        print(line)
    return summary


# --- long run -------------------------------------------------------------------------------


async def _refreshing_pods(cp: CpServer, tokens: list[str], until: float) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(cp.ca_file))
    stats = {"requests": 0, "issued": 0, "failed": 0}

    async def pod(token: str) -> None:
        await asyncio.sleep(random.uniform(0, 5))  # pods do not all start in one instant
        while time.monotonic() < until:
            wait = 1.0
            try:
                reader, writer = await _connect(cp.base, ctx)
                try:
                    status, headers, body = await _exchange(
                        reader, writer, _get(cp.base, "/token", token)
                    )
                finally:
                    writer.close()
                stats["requests"] += 1
                if status == 200:
                    stats["issued"] += 1
                    wait = json.loads(body)["expires_in"] * 0.5 * random.uniform(0.9, 1.1)
                else:
                    stats["failed"] += 1
                    wait = float(headers.get("retry-after", "1"))
            except (OSError, asyncio.IncompleteReadError, ValueError):
                stats["failed"] += 1
            await asyncio.sleep(min(wait, max(0.0, until - time.monotonic())))

    await asyncio.gather(*(pod(t) for t in tokens))
    return stats


def _slope_kib_per_min(samples: list[tuple[float, int]]) -> float:
    xs = [t / 60 for t, _ in samples]
    ys = [float(r) for _, r in samples]
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def run_long(bench: Bench, pods: int, minutes: float, ttl: int) -> list[str]:
    tokens = bench.tokens[:pods]
    extra = {"CP_TOKEN_TTL": str(ttl), "CP_TOKEN_MIN_TTL": str(max(1, ttl // 4))}
    cps = {mode: bench.start_cp(mode, extra, "long") for mode in MODES}
    try:
        calls0 = {m: sum(cp.kube_calls().values()) for m, cp in cps.items()}
        rss: dict[str, list[tuple[float, int]]] = {m: [] for m in MODES}
        start = time.monotonic()
        until = start + minutes * 60

        async def sample() -> None:
            while time.monotonic() < until:
                for m, cp in cps.items():
                    rss[m].append((time.monotonic() - start, rss_kib(cp.proc.pid)))
                await asyncio.sleep(10)

        async def run() -> list[dict[str, Any]]:
            results = await asyncio.gather(
                sample(), *(_refreshing_pods(cp, tokens, until) for cp in cps.values())
            )
            return list(results[1:])

        stats = dict(zip(MODES, asyncio.run(run()), strict=True))
        elapsed_h = (time.monotonic() - start) / 3600
        lines = []
        print(
            f"\nlong run: {pods} pods refreshing at half-life, CP_TOKEN_TTL={ttl} s, "
            f"{minutes:g} min (load average {os.getloadavg()[0]:.1f})"
        )
        print(
            f" {'mode':<12} {'requests':>9} {'issued':>7} {'failed':>7} {'API calls':>9} "
            f"{'calls/pod-h':>11} {'x goal':>7} {'RSS MiB':>15} {'slope KiB/min':>13}"
        )
        for m, cp in cps.items():
            calls = sum(cp.kube_calls().values()) - calls0[m]
            per_pod_hour = calls / (pods * elapsed_h)
            warm = [s for s in rss[m] if s[0] >= min(120.0, minutes * 60 / 3)]
            slope = _slope_kib_per_min(warm)
            first, last = rss[m][0][1] / 1024, rss[m][-1][1] / 1024
            s = stats[m]
            print(
                f" {m:<12} {s['requests']:9d} {s['issued']:7d} {s['failed']:7d} {calls:9.0f} "
                f"{per_pod_hour:11.1f} {per_pod_hour / GOAL_CALLS_PER_POD_HOUR:7.1f} "
                f"{first:6.1f} -> {last:6.1f} {slope:13.1f}"
            )
            lines.append(
                f" {m}: {per_pod_hour:.1f} API calls per pod-hour "
                f"({per_pod_hour / GOAL_CALLS_PER_POD_HOUR:.1f}x the goal of "
                f"{GOAL_CALLS_PER_POD_HOUR:g}); RSS slope {slope:.1f} KiB/min; "
                f"by call {_by_call(cp)}"
            )
        for line in lines:
            print(line)
        return lines
    finally:
        for cp in cps.values():
            cp.stop()


def _by_call(cp: CpServer) -> dict[str, float]:
    return {f"{c} {r}": n for (c, r), n in sorted(kube_calls(cp.metrics_text()).items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/bench_cluster.py")
    parser.add_argument("--pods", type=int, default=1000, help="pods in the burst")
    parser.add_argument("--long-pods", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the long run")
    parser.add_argument("--ttl", type=int, default=120, help="CP_TOKEN_TTL in the long run")
    parser.add_argument("--part", choices=("burst", "long", "both"), default="both")
    args = parser.parse_args(argv)
    print(f"bench_cluster: a real kube-apiserver on loopback, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        pods = max(args.pods if args.part != "long" else 0, args.long_pods)
        bench = set_up(Path(tmp), pods)
        try:
            if args.part in ("burst", "both"):
                run_burst(bench, args.pods)
            if args.part in ("long", "both"):
                run_long(bench, args.long_pods, args.minutes, args.ttl)
        finally:
            bench.cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
