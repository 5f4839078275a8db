"""``cp-token serve`` as a real process under hostile load: memory, forged floods, a hung API.

The fake kube-apiserver runs in this process (its own thread, real HTTPS); the CP is a
separate process whose resident memory is read from /proc. Load comes from keep-alive
connections of an async client. Every bound asserted here is a SPEC sentence.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.fixtures import SESSION_NS, SESSION_POD, SESSION_SA, new_sessions
from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.integration.cp_rig import b64
from tests.integration.procs import Proc, cp_serve, write_identities

MiB = 1024 * 1024
TOKEN_SIZE = 16_000  # just under the 16 KiB bearer limit


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def unknown_jwt(kid: str, size: int = TOKEN_SIZE, tag: str = "") -> str:
    """A well-formed JWT (real kid, aud ambient-cp, future exp) that nobody signed."""
    head = b64(json.dumps({"alg": "RS256", "kid": kid}).encode())
    claims: dict[str, Any] = {
        "aud": ["ambient-cp"],
        "exp": int(time.time()) + 3600,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": "system:serviceaccount:session-ns:session-x-sa",
        "tag": tag,
    }
    used = len(head) + 2 + 342 + len(b64(json.dumps(claims).encode()))
    claims["pad"] = "x" * max(0, (size - used) * 3 // 4 - 10)
    return f"{head}.{b64(json.dumps(claims).encode())}.{b64(secrets.token_bytes(256))}"


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int, token: str
) -> int:
    """One keep-alive ``GET /token`` on raw streams; the status (the body is read and dropped)."""
    writer.write(
        f"GET /token HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    await reader.readexactly(length)
    return int(head[9:12])


async def send_all(base: str, tokens: Iterable[str], conc: int) -> Counter[int]:
    """Every token once as ``GET /token`` over ``conc`` keep-alive connections.

    Raw asyncio streams rather than an HTTP client library: thousands of requests from the
    test process must cost it little, or the client, not the CP, sets the pace.
    """
    port = int(base.rsplit(":", 1)[1])
    it: Iterator[str] = iter(tokens)
    counts: Counter[int] = Counter()

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for token in it:
                counts[await _exchange(reader, writer, port, token)] += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(conc)))
    return counts


def pods_client(base: str, pods: int) -> httpx.AsyncClient:
    """One client with a connection per pod, made before any timing starts."""
    limits = httpx.Limits(max_connections=pods, max_keepalive_connections=pods)
    return httpx.AsyncClient(base_url=base, limits=limits, timeout=30, trust_env=False)


async def timed_get(client: httpx.AsyncClient, token: str) -> tuple[int, float]:
    """``GET /token`` as one pod: (status, seconds to the answer)."""
    t0 = time.monotonic()
    resp = await client.get("/token", headers={"Authorization": f"Bearer {token}"})
    return resp.status_code, time.monotonic() - t0


def start(env: dict[str, str], tmp_path: Path) -> tuple[Proc, str]:
    proc, base, metrics = cp_serve(
        {"CP_TOKEN_MINTER": "jwt", "CP_TOKEN_RATE_LIMIT": "100000/s,100000", **env},
        tmp_path / "cp.log",
    )
    proc.wait_http(f"{metrics}/readyz")
    return proc, base


# --- memory stays bounded under any request stream ---------------------------------------------


@pytest.mark.timeout(240)
async def test_replaying_one_unknown_16k_token_does_not_grow_memory(
    kube_apiserver: FakeKubeAPIServer, kubeconfig: Path, tmp_path: Path
) -> None:
    # Keys unreadable: the pre-check is skipped, so the token goes to TokenReview and then
    # to the negative cache: the path that used to keep every replay's traceback.
    kube_apiserver.deny("get", "", "/openid/v1/jwks")
    proc, base = start({"KUBECONFIG": str(kubeconfig), "CP_TOKEN_AUTHN": "tokenreview"}, tmp_path)
    try:
        kid = kube_apiserver.signing_kid
        warm = [unknown_jwt(kid, tag=f"warm{i}") for i in range(300)]
        assert await send_all(base, warm, 16) == Counter({401: 300})
        kube_apiserver.reset_counts()
        token = unknown_jwt(kid, tag="replayed")
        before = rss(proc.pid)
        counts = await send_all(base, [token] * 3000, 16)
        grown = rss(proc.pid) - before
        assert counts == Counter({401: 3000})
        # remembered by hash for 5 s: a handful of reviews, not 3,000
        assert kube_apiserver.calls("tokenreviews") <= 10
        assert grown <= 24 * MiB, f"CP grew {grown / MiB:.1f} MiB"
    finally:
        assert proc.terminate() == 0


@pytest.mark.timeout(240)
async def test_distinct_16k_garbage_tokens_plateau(
    kube_apiserver: FakeKubeAPIServer, kubeconfig: Path, tmp_path: Path
) -> None:
    proc, base = start({"KUBECONFIG": str(kubeconfig), "CP_TOKEN_AUTHN": "tokenreview"}, tmp_path)
    try:
        kid = kube_apiserver.signing_kid
        samples = [rss(proc.pid)]
        for batch in range(3):
            tokens = (unknown_jwt(kid, tag=f"{batch}-{i}") for i in range(800))
            assert await send_all(base, tokens, 16) == Counter({401: 800})
            samples.append(rss(proc.pid))
        assert kube_apiserver.calls("tokenreviews") == 0  # forged: refused by signature
        assert samples[-1] - samples[0] <= 24 * MiB, [s / MiB for s in samples]
        assert samples[-1] - samples[1] <= 12 * MiB, [s / MiB for s in samples]  # a plateau
    finally:
        assert proc.terminate() == 0


@pytest.mark.timeout(240)
async def test_static_mode_with_large_tokens_is_bounded(tmp_path: Path) -> None:
    ids = write_identities(tmp_path / "ids.json", "dev", f"system:serviceaccount:ns:{SESSION_SA}")
    proc, base = start(
        {"CP_TOKEN_AUTHN": "static", "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ids)}, tmp_path
    )
    try:
        before = rss(proc.pid)
        tokens = (secrets.token_urlsafe(12_000)[:TOKEN_SIZE] for _ in range(2000))
        assert await send_all(base, tokens, 16) == Counter({401: 2000})
        over = ["a" * (17 * 1024)] * 50  # over 16 KiB: refused unparsed
        assert await send_all(base, over, 4) == Counter({401: 50})
        grown = rss(proc.pid) - before
        assert grown <= 24 * MiB, f"CP grew {grown / MiB:.1f} MiB"
    finally:
        assert proc.terminate() == 0


# --- forged floods cost the API server nothing, and starve nobody -----------------------------


@pytest.mark.timeout(240)
async def test_forged_flood_at_slow_token_review_starves_no_real_pod(
    kube_apiserver: FakeKubeAPIServer, kubeconfig: Path, tmp_path: Path
) -> None:
    proc, base = start({"KUBECONFIG": str(kubeconfig), "CP_TOKEN_AUTHN": "tokenreview"}, tmp_path)
    try:
        good = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as client:
            warm = await client.get("/token", headers={"Authorization": f"Bearer {good}"})
            assert warm.status_code == 200, warm.text
        legit = new_sessions(kube_apiserver, 20, "legit")
        head, payload, _ = good.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        forged = [  # the real kid, plausible claims, a signature nobody made
            f"{head}.{b64(json.dumps({**claims, 'jti': str(i)}).encode())}."
            f"{b64(secrets.token_bytes(256))}"
            for i in range(3000)
        ]
        kube_apiserver.reset_counts()
        kube_apiserver.set_latency(0.5, "tokenreviews")

        flood = asyncio.create_task(send_all(base, forged, 200))
        async with pods_client(base, len(legit)) as client:
            await asyncio.sleep(0.5)  # the flood is under way
            assert not flood.done()
            pods = await asyncio.gather(*(timed_get(client, t) for t in legit))
        flooded = await flood
        assert [s for s, _ in pods] == [200] * 20, pods
        assert max(t for _, t in pods) <= 10.0, pods
        assert flooded == Counter({401: 3000})
        assert kube_apiserver.calls("tokenreviews") == 20  # only the real pods'
    finally:
        kube_apiserver.set_latency(0, None)
        assert proc.terminate() == 0


@pytest.mark.timeout(120)
async def test_hung_api_server_new_pods_get_503_within_12s(
    kube_apiserver: FakeKubeAPIServer, kubeconfig: Path, tmp_path: Path
) -> None:
    tokens = new_sessions(kube_apiserver, 30, "hung")
    proc, base = start({"KUBECONFIG": str(kubeconfig), "CP_TOKEN_AUTHN": "tokenreview"}, tmp_path)
    kube_apiserver.fail(None, "hang")  # every route: TokenReview, keys, label reads
    try:
        async with pods_client(base, len(tokens)) as client:
            results = await asyncio.gather(*(timed_get(client, t) for t in tokens))
        assert {s for s, _ in results} == {503}, results
        assert max(t for _, t in results) < 12.0, results
    finally:
        kube_apiserver.fail(None, None)
        assert proc.terminate() == 0


# --- revocation: caches do not stack ------------------------------------------------------------


@pytest.mark.timeout(120)
def test_deleted_pod_refused_within_liveness_ttl(
    kube_apiserver: FakeKubeAPIServer, kubeconfig: Path, tmp_path: Path
) -> None:
    """jwks authn, real time: the second token of a pod is first reviewed 9 s after the pod
    was read; it must still stop working 10 s after the pod's deletion, not 19 s."""
    proc, base = start({"KUBECONFIG": str(kubeconfig), "CP_TOKEN_AUTHN": "jwks"}, tmp_path)
    first = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    second = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)

    def status(token: str) -> int:
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.get(f"{base}/token", headers=headers, trust_env=False, timeout=15).status_code

    try:
        assert status(first) == 200  # the pod is read now
        kube_apiserver.delete_pod(SESSION_NS, SESSION_POD)
        deleted = time.monotonic()
        while time.monotonic() - deleted < 8.5:  # the read ages in the real process
            assert status(first) == 200  # within the TTL the cached answer may serve
            time.sleep(0.25)
        assert status(second) == 200  # first seen now, from the 8.5 s old read: allowed
        while status(second) == 200:
            assert time.monotonic() - deleted < 10.5, "a deleted pod's token outlived the TTL"
            time.sleep(0.1)
        assert time.monotonic() - deleted >= 9.0  # refused because the read expired, not early
    finally:
        assert proc.terminate() == 0
