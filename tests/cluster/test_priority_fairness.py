"""Flow 7: API Priority and Fairness for real: 300 new pods ask at once, the API server sheds.

A second, small API server (own etcd): ``--max-requests-inflight=10``,
``--max-mutating-requests-inflight=5`` (15 seats in all), and the CP's ServiceAccount in a
priority level of its own, as an operator caps a tenant: one seat, one queue of 4, so a burst
overflows it and APF answers 429 with its ``Retry-After``. 300 sessions (namespace,
ServiceAccounts, pods; no opt-in label: no webhook cost) and a pod-bound token each, then the
300 pods ask the CP at once, each honouring the CP's ``Retry-After`` as the sidecar does.

- every pod gets its token; nothing is lost (every request answered; no 5xx but 503, no
  401/403);
- the API server did shed the CP (its own ``apiserver_flowcontrol_rejected_requests_total`` for
  that priority level, the CP's kube-call metrics by result, the audit log);
- the CP honours each 429's ``Retry-After``: after the API server answered it 429 (APF's
  Retry-After is at least 1 s), the CP starts nothing new for that long (audit log; calls
  it had started before it could read the 429 may still arrive: at most a fifth of all).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from .cluster import ROOT, Cluster, build_tools
from .conftest import AUTHN_MODES, CP_USERNAME, install_control_plane
from .session import (
    CONTROL_PLANE,
    CP_AUDIENCE,
    CP_NAMESPACE,
    CP_SERVICE_ACCOUNT,
    MANAGED_NS,
    MANAGED_SA,
    CpServer,
)

PODS = 300
NS = "pf-load"
PRIORITY_LEVEL = "cp-token"
# how long the 300 pods may take, all told
DEADLINE = 120.0
# the smallest Retry-After APF gives; a little for clocks and the CP's own reaction
MIN_RETRY_AFTER = 1.0
REACTION = 0.1
BURST = 40  # TokenReviews sent together to overflow the level (1 seat, a queue of 4)
# calls already under way when a 429 came back may reach the API server after it (see below)
MAX_TOO_SOON = 0.2


def apf_objects() -> list[dict[str, Any]]:
    """The CP's ServiceAccount in a priority level of its own: one seat, a queue of 4."""
    return [
        {
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
            "kind": "PriorityLevelConfiguration",
            "metadata": {"name": PRIORITY_LEVEL},
            "spec": {
                "type": "Limited",
                "limited": {
                    "nominalConcurrencyShares": 1,
                    "lendablePercent": 0,
                    "borrowingLimitPercent": 0,
                    "limitResponse": {
                        "type": "Queue",
                        "queuing": {"queues": 1, "handSize": 1, "queueLengthLimit": 4},
                    },
                },
            },
        },
        {
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
            "kind": "FlowSchema",
            "metadata": {"name": PRIORITY_LEVEL},
            "spec": {
                "priorityLevelConfiguration": {"name": PRIORITY_LEVEL},
                "matchingPrecedence": 500,
                "distinguisherMethod": {"type": "ByUser"},
                "rules": [
                    {
                        "subjects": [
                            {
                                "kind": "ServiceAccount",
                                "serviceAccount": {
                                    "name": CP_SERVICE_ACCOUNT,
                                    "namespace": CP_NAMESPACE,
                                },
                            }
                        ],
                        "resourceRules": [
                            {
                                "verbs": ["*"],
                                "apiGroups": ["*"],
                                "resources": ["*"],
                                "clusterScope": True,
                                "namespaces": ["*"],
                            }
                        ],
                        "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                    }
                ],
            },
        },
    ]


def apiserver_metric(cluster: Cluster, name: str, **labels: str) -> float:
    """The sum of a metric's series matching ``labels``, from the API server's /metrics."""
    with cluster.client() as c:
        text = c.get("/metrics").text
    total = 0.0
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m[1]))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m[2])
    return total


def session_objects(n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(namespace and ServiceAccounts, pods) of ``n`` sessions, as Lists for one apply each."""
    sas: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": MANAGED_NS}}
    ]
    pods = []
    for i in range(n):
        sa = f"session-pf{i}-sa"
        sas.append(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": sa, "namespace": NS, "labels": MANAGED_SA},
                "automountServiceAccountToken": False,
            }
        )
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"runner-pf{i}", "namespace": NS},
                "spec": {
                    "serviceAccountName": sa,
                    "automountServiceAccountToken": False,
                    "containers": [{"name": "runner", "image": "registry.example.com/runner:1"}],
                },
            }
        )
    return sas, pods


def as_list(items: list[dict[str, Any]]) -> list[str]:
    import json

    return [json.dumps({"apiVersion": "v1", "kind": "List", "items": items})]


def token_request(cluster: Cluster, i: int) -> str:
    """A pod-bound token of session ``i`` from the TokenRequest API (as the admin, exempt
    from the CP's priority level)."""
    resp = cluster.request(
        "POST",
        f"/api/v1/namespaces/{NS}/serviceaccounts/session-pf{i}-sa/token",
        body={
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [CP_AUDIENCE],
                "expirationSeconds": 3600,
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": f"runner-pf{i}"},
            },
        },
    )
    assert resp.status_code == 201, resp.text
    token: str = resp.json()["status"]["token"]
    return token


@dataclass
class Small:
    cluster: Cluster
    pki: trustme.CA
    signing_key: Path
    tokens: list[str]
    work: Path
    retry_afters: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def small(
    pki: trustme.CA, signing_key: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Small]:
    """The small API server, k8s/base applied, APF configured, 300 sessions and tokens."""
    work = tmp_path_factory.mktemp("small-cluster")
    c = Cluster(
        build_tools(),
        work,
        apiserver_args=("--max-requests-inflight=10", "--max-mutating-requests-inflight=5"),
    )
    c.start()
    try:
        c.install_crds()
        install_control_plane(c)
        c.apply("-k", str(ROOT / "k8s" / "base"))
        c.apply_objects(*apf_objects())
        c.wait_for(
            "the CP's priority level in force",
            lambda: (
                apiserver_metric(
                    c, "apiserver_flowcontrol_nominal_limit_seats", priority_level=PRIORITY_LEVEL
                )
                >= 1
            ),
        )
        sas, pods = session_objects(PODS)
        c.apply("-f", "-", as_user=CONTROL_PLANE, stdin=as_list(sas)[0])
        c.apply("-f", "-", stdin=as_list(pods)[0])
        with ThreadPoolExecutor(8) as pool:
            tokens = list(pool.map(lambda i: token_request(c, i), range(PODS)))
        yield Small(c, pki, signing_key, tokens, work)
        # Over the whole run the API server shed the CP, but never refused it 403
        assert not [
            e for e in c.audit_events(CP_USERNAME) if e["responseStatus"].get("code") == 403
        ]
    finally:
        c.stop()


def test_apf_sheds_a_burst_from_the_cps_identity(small: Small) -> None:
    """The set-up works as intended: 40 TokenReviews at once with the CP's own token overflow
    its priority level; APF answers 429 with a whole-seconds Retry-After.

    "At once" for real: each thread opens its connection first (a TLS handshake in a Python
    thread takes longer than a TokenReview, so 40 cold clients never had five requests in
    flight together and the level once did not shed), then all send on a barrier."""
    c = small.cluster
    token = c.create_token(CP_NAMESPACE, CP_SERVICE_ACCOUNT)
    ctx = ssl.create_default_context(cafile=str(c.ca_file))
    auth = {"Authorization": f"Bearer {token}"}
    burst = threading.Barrier(BURST)

    def review(_: int) -> httpx.Response:
        with httpx.Client(base_url=c.url, verify=ctx, trust_env=False, timeout=30) as h:
            h.get("/version", headers=auth)  # the connection, before the burst (any answer)
            burst.wait(timeout=60)
            return h.post(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                headers=auth,
                json={
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenReview",
                    "spec": {"token": small.tokens[0], "audiences": [CP_AUDIENCE]},
                },
            )

    with ThreadPoolExecutor(BURST) as pool:
        answers = list(pool.map(review, range(BURST)))
    statuses = {r.status_code for r in answers}
    assert statuses <= {201, 429}, statuses
    shed = [r for r in answers if r.status_code == 429]
    assert shed, "no 429: the priority level did not shed"
    for r in shed:
        assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1
        # APF's answer is plain text, not a Status object
        assert r.headers["content-type"].startswith("text/plain")
        assert "Too many requests" in r.text


@dataclass
class PodResult:
    statuses: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


async def pod_asks(client: httpx.AsyncClient, token: str, start: float) -> PodResult:
    """One pod: ask until served, waiting what each Retry-After says (as the sidecar does)."""
    result = PodResult()
    while time.monotonic() - start < DEADLINE:
        try:
            resp = await client.get("/token", headers={"Authorization": f"Bearer {token}"})
        except httpx.HTTPError as exc:
            result.statuses.append(0)
            result.errors.append(repr(exc))
            await asyncio.sleep(1)
            continue
        result.statuses.append(resp.status_code)
        if resp.status_code == 200:
            break
        if resp.status_code not in (429, 503):
            break  # a refusal: the test fails on it
        await asyncio.sleep(float(resp.headers.get("retry-after", "1")))
    result.seconds = time.monotonic() - start
    return result


async def all_pods_ask(cp: CpServer, tokens: list[str]) -> list[PodResult]:
    ctx = ssl.create_default_context(cafile=str(cp.ca_file))
    # a connection per request: a pod comes back after its Retry-After, by when the CP has
    # closed the idle one (5 s), and reusing a closed connection is the client's race
    limits = httpx.Limits(max_connections=len(tokens), max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=cp.base, verify=ctx, trust_env=False, timeout=30, limits=limits
    ) as client:
        start = time.monotonic()
        return await asyncio.gather(*(pod_asks(client, t, start) for t in tokens))


def stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.mark.parametrize("mode", AUTHN_MODES)
def test_300_new_pods_at_once_all_get_their_token(
    small: Small, mode: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    c = small.cluster
    work = tmp_path_factory.mktemp(f"cp-pf-{mode}")
    cp = CpServer.start(
        c,
        small.pki,
        work,
        mode=mode,
        port=_free_port(),
        signing_key=small.signing_key,
        # 300 pods behind one address (a node's pods behind its SNAT): no per-client cap
        extra={"CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT": "0"},
    )
    try:
        shed_before = apiserver_metric(
            c, "apiserver_flowcontrol_rejected_requests_total", priority_level=PRIORITY_LEVEL
        )
        since = time.time()
        results = asyncio.run(all_pods_ask(cp, small.tokens))
        kube = cp.kube_calls()
        metrics_text = cp.metrics_text()
    finally:
        cp.stop()
    served = [r for r in results if r.statuses and r.statuses[-1] == 200]
    odd = sorted({s for r in results for s in r.statuses} - {200, 429, 503})
    errors = [e for r in results for e in r.errors]
    assert not odd, f"{mode}: answers other than 200/429/503: {odd} {errors[:5]}"
    assert len(served) == PODS, f"{mode}: {PODS - len(served)} pods without a token"
    assert 'outcome="internal"' not in metrics_text
    # the API server shed the CP, and the CP saw it
    shed = (
        apiserver_metric(
            c, "apiserver_flowcontrol_rejected_requests_total", priority_level=PRIORITY_LEVEL
        )
        - shed_before
    )
    assert shed > 0, f"{mode}: APF shed nothing; the test did not test"
    seen_429 = sum(n for (_, result), n in kube.items() if result == "429")
    assert seen_429 > 0, f"{mode}: the CP saw no 429 ({kube})"
    # ... and honoured each one's Retry-After: nothing new for at least a second after it
    events = sorted(
        (stamp(e["requestReceivedTimestamp"]), stamp(e["stageTimestamp"]), e["responseStatus"])
        for e in c.audit_events(CP_USERNAME)
        if stamp(e["requestReceivedTimestamp"]) >= since
    )
    too_soon: set[float] = set()
    for _, answered, status in events:
        if status.get("code") != 429:
            continue
        window = (answered + REACTION, answered + MIN_RETRY_AFTER - REACTION)
        too_soon.update(r for r, _, _ in events if window[0] < r < window[1])
    calls = sum(kube.values())
    # A call the CP had already started when the 429 came back (waiting for its connection's
    # TLS handshake while the CP's event loop was busy with the pods' own handshakes) reaches
    # the API server late, after the 429 was answered: a burst within milliseconds, 0 to 39 of
    # about 660 calls in the runs on record. A CP that ignores Retry-After sends most of its
    # calls inside these windows (measured with the kube client's hold disabled: 1,263 of
    # 1,388 calls, 481 429s).
    assert len(too_soon) <= MAX_TOO_SOON * calls, (
        f"{mode}: {len(too_soon)} calls sent within {MIN_RETRY_AFTER:g} s of a 429 "
        f"({seen_429:g} 429s, {calls:g} calls for {PODS} pods)"
    )


def _free_port() -> int:
    from cp_token.runtime.processes import free_port

    return free_port()
