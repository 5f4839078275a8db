"""A real CP (``cp-token serve``) against the fake kube-apiserver while the cluster does what
real clusters do: the ServiceAccount signing key rotates, the API server goes away, the API
server answers 429. Real time, real sockets, HTTPS to the fake.

Shared by ``tests/integration/test_kube_fault_processes.py`` (the assertions, short runs) and
``bench/bench_recovery.py`` (the figures). Every process is stopped by its pid.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.fakes.fixtures import (
    MANAGED_BY_LABEL,
    MANAGED_NS_LABEL,
    SESSION_NS,
    SESSION_POD,
    SESSION_SA,
    new_sessions,
)
from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.integration.procs import Proc, cp_serve

__all__ = ["OutageRun", "StormRun", "outage_run", "rotation_recovery", "storm_429"]

REVIEW_CACHE_TTL = 30.0  # the CP's default CP_TOKEN_REVIEW_CACHE_TTL


def _cluster() -> FakeKubeAPIServer:
    kube = FakeKubeAPIServer().start()
    kube.add_namespace(SESSION_NS, labels=MANAGED_NS_LABEL)
    kube.add_service_account(SESSION_NS, SESSION_SA, labels=MANAGED_BY_LABEL)
    kube.add_pod(SESSION_NS, SESSION_POD, SESSION_SA)
    return kube


def _cp(kube: FakeKubeAPIServer, workdir: Path, authn: str, **extra: str) -> tuple[Proc, str, str]:
    """A CP on the fake (jwt minter, no rate limit in the way); (proc, base, metrics) once
    ready."""
    env = {
        "KUBECONFIG": str(kube.write_kubeconfig(workdir / "kubeconfig")),
        "CP_TOKEN_AUTHN": authn,
        "CP_TOKEN_MINTER": "jwt",
        "CP_TOKEN_RATE_LIMIT": "10000/s,10000",
        "CP_TOKEN_LOG_LEVEL": "warning",
        **extra,
    }
    proc, base, metrics = cp_serve(env, workdir / f"cp-{authn}.log")
    try:
        proc.wait_http(f"{metrics}/readyz")
    except BaseException:
        proc.kill()
        raise
    return proc, base, metrics


def _get(http: httpx.Client, token: str) -> httpx.Response:
    return http.get("/token", headers={"Authorization": f"Bearer {token}"})


def kube_calls(metrics: str) -> int:
    """The CP's own count of Kubernetes API calls (attempts that reached the wire)."""
    text = httpx.get(f"{metrics}/metrics", trust_env=False, timeout=5).text
    return int(
        sum(
            float(n) for n in re.findall(r"^cp_token_kube_api_calls_total\{.*\} (\S+)$", text, re.M)
        )
    )


# --- key rotation ----------------------------------------------------------------------------


def rotation_recovery(workdir: Path, authn: str) -> tuple[float, int]:
    """The API server rotates its signing key right after the CP read its key set; a pod with
    a token of the new key asks (and asks again every 0.1 s until served). Returns (seconds to
    its first token, the status of its first answer)."""
    kube = _cluster()
    proc = None
    try:
        proc, base, _ = _cp(kube, workdir, authn)
        with httpx.Client(base_url=base, trust_env=False, timeout=15) as http:
            old = kube.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
            if _get(http, old).status_code != 200:  # the CP reads the key set now
                raise AssertionError(f"no token before the rotation:\n{proc.output()[-2000:]}")
            kube.rotate_signing_key("ES256")
            token = kube.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
            started = time.monotonic()
            first = _get(http, token).status_code
            status = first
            while status != 200:
                if time.monotonic() - started > 90:
                    raise AssertionError("no token within 90 s of the rotation")
                time.sleep(0.1)
                status = _get(http, token).status_code
            return time.monotonic() - started, first
    finally:
        if proc is not None:
            proc.kill()
        kube.close()


# --- an outage ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutageRun:
    """One outage: what callers decided just before it saw, and what it cost the API."""

    calls: int  # requests of callers decided within CP_TOKEN_REVIEW_CACHE_TTL (30 s)
    failed: int  # of those, not answered 200
    slowest: float  # the slowest of those answers, seconds
    api_calls: int  # Kubernetes API calls the CP made during the outage
    new_pod_seconds: float  # the slowest answer (a 503) to a pod never decided
    seconds: float  # the outage


def outage_run(
    workdir: Path,
    authn: str,
    *,
    outage: float = 25.0,
    pods: int = 20,
    every: float = 1.0,
    mode: str = "refused",
    **extra: str,
) -> OutageRun:
    """``pods`` callers are decided, then the API server is down for ``outage`` seconds
    (``refused``: it stops listening; ``500``/``hang``: it answers so, or not at all); each
    caller asks again every ``every`` seconds meanwhile, with its same token, and a pod never
    decided asks too."""
    kube = _cluster()
    proc = None
    try:
        tokens = new_sessions(kube, pods, "o")
        kube.add_service_account(SESSION_NS, "session-late-sa", labels=MANAGED_BY_LABEL)
        kube.add_pod(SESSION_NS, "runner-late", "session-late-sa")
        late = kube.issue_bound_token(SESSION_NS, "session-late-sa", pod="runner-late")
        proc, base, metrics = _cp(kube, workdir, authn, **extra)
        with httpx.Client(base_url=base, trust_env=False, timeout=15) as http:
            for token in tokens:
                if _get(http, token).status_code != 200:
                    raise AssertionError(f"a pod was refused:\n{proc.output()[-2000:]}")
            before = kube_calls(metrics)
            decided = time.monotonic()
            if mode == "refused":
                kube.stop()
            else:
                kube.fail(None, mode)
            started = time.monotonic()
            calls = failed = 0
            slowest = slowest_new = 0.0
            while time.monotonic() - started < outage:
                round_start = time.monotonic()
                for token in tokens:
                    if time.monotonic() - decided >= REVIEW_CACHE_TTL:
                        break  # decided too long ago: a 503 is the contract
                    calls += 1
                    t0 = time.monotonic()
                    try:
                        failed += _get(http, token).status_code != 200
                    except httpx.HTTPError:
                        failed += 1
                    slowest = max(slowest, time.monotonic() - t0)
                t0 = time.monotonic()
                try:
                    _get(http, late)
                except httpx.HTTPError:
                    pass
                slowest_new = max(slowest_new, time.monotonic() - t0)
                time.sleep(max(0.0, every - (time.monotonic() - round_start)))
            seconds = time.monotonic() - started
            api_calls = kube_calls(metrics) - before
        return OutageRun(calls, failed, slowest, api_calls, slowest_new, seconds)
    finally:
        if proc is not None:
            proc.kill()
        kube.close()


# --- a 429 storm ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StormRun:
    """New pods asking while the API server answers 429."""

    pods: int
    api_calls: int  # API calls that reached the server while it answered 429
    cp_answers: int  # answers the pods got from the CP meantime
    served_after: float  # seconds from the API server answering again to every pod served


def storm_429(
    workdir: Path,
    authn: str,
    *,
    pods: int = 50,
    seconds: float = 20.0,
    retry_after: int = 10,
) -> StormRun:
    """``pods`` new pods ask for their first token while the API server answers 429 with
    ``Retry-After: retry_after`` for ``seconds``; each pod retries as a sidecar does (after
    the CP's Retry-After, spread over 1-2x). Then the API server answers again."""
    kube = _cluster()
    proc = None
    try:
        tokens = new_sessions(kube, pods, "s")
        proc, base, _ = _cp(kube, workdir, authn)
        warm = kube.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
        with httpx.Client(base_url=base, trust_env=False, timeout=15) as http:
            if _get(http, warm).status_code != 200:  # keys and the namespace are read
                raise AssertionError(f"no token before the storm:\n{proc.output()[-2000:]}")
        kube.fail(None, "429", retry_after=retry_after)
        kube.reset_counts()
        answers, healed = asyncio.run(_storm(base, tokens, kube, seconds))
        return StormRun(pods, answers[1], answers[0], healed)
    finally:
        if proc is not None:
            proc.kill()
        kube.close()


async def _storm(
    base: str, tokens: list[str], kube: FakeKubeAPIServer, seconds: float
) -> tuple[tuple[int, int], float]:
    """((CP answers during the storm, API calls during it), seconds from heal to all served)."""
    served: dict[int, float] = {}
    answers = 0
    storm_end = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=15) as http:

        async def pod(i: int, token: str) -> None:
            nonlocal answers
            await asyncio.sleep(random.uniform(0, 1))  # pods start within a second
            while True:
                resp = await http.get("/token", headers={"Authorization": f"Bearer {token}"})
                if time.monotonic() < storm_end:
                    answers += 1
                if resp.status_code == 200:
                    served[i] = time.monotonic()
                    return
                wait = float(resp.headers.get("retry-after", "1"))
                await asyncio.sleep(wait * random.uniform(1, 2))

        tasks = [asyncio.create_task(pod(i, t)) for i, t in enumerate(tokens)]
        await asyncio.sleep(max(0.0, storm_end - time.monotonic()))
        storm_calls = kube.calls()
        kube.fail(None, None)
        healed = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return (answers, storm_calls), max(served.values()) - healed
