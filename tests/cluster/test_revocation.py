"""Flow 3: revocation for real, in both authn modes, measured against the documented bound.

A CP of its own per mode with short caches (so the bound is seconds, not minutes), a caller
that keeps asking (its caches stay warm, the worst case), then the revocation through the API
server: the pod deleted, the ServiceAccount deleted, the namespace's label removed. The first
refusal must come within the documented bound of the moment the revocation started:

- pod deleted: ``tokenreview`` within ``CP_TOKEN_REVIEW_CACHE_TTL`` (the API server refuses
  the token at the next review); ``jwks`` within ``CP_TOKEN_LIVENESS_CACHE_TTL`` (the
  existence check), although the review cache would keep it 30 s: caches do not stack;
- ServiceAccount deleted: the same bounds;
- namespace label removed: the label reads are reused for ``CP_TOKEN_LIVENESS_CACHE_TTL``.

Found by this tier: the real kube-apiserver caches a successful token authentication for 10 s
(its token authenticator's success cache, not configurable), so a TokenReview keeps saying
"authenticated" for about 10 s after the bound pod is deleted
(``test_the_api_server_itself_caches_a_review_for_10_s``). With ``tokenreview`` authn the CP's
cache stacked on the API server's: a deleted pod's token was served for up to
``CP_TOKEN_REVIEW_CACHE_TTL`` + 10 s, past SPEC's bound. Now the CP reads the pod beside each
review (as it does with ``jwks``, through the object cache) and refuses before the API server
does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from .cluster import Cluster
from .conftest import AUTHN_MODES, start_extra_cp
from .session import CONTROL_PLANE, CpServer, Injector, make_session, pod_token

LIVENESS_TTL = 2.0
REVIEW_TTL = 3.0
# A poll's own time (a request through TLS, a kubectl process start) and its interval.
SLACK = 1.0
POLL = 0.1


@dataclass
class Revoking:
    """A CP with short caches, and the bound each kind of revocation must meet."""

    cp: CpServer
    pod_bound: float
    label_bound: float


@pytest.fixture(scope="module", params=AUTHN_MODES)
def revoking(
    request: pytest.FixtureRequest,
    cluster: Cluster,
    injector: Injector,
    pki: trustme.CA,
    signing_key: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Revoking]:
    mode: str = request.param
    extra = {
        "CP_TOKEN_LIVENESS_CACHE_TTL": str(LIVENESS_TTL),
        # the caller polls ten times a second
        "CP_TOKEN_RATE_LIMIT": "100/s,100",
    }
    if mode == "tokenreview":
        extra["CP_TOKEN_REVIEW_CACHE_TTL"] = str(REVIEW_TTL)
        pod_bound = REVIEW_TTL
    else:
        # the default review cache (30 s) stays: the liveness check must still bound it
        pod_bound = LIVENESS_TTL
    work = tmp_path_factory.mktemp(f"cp-revoke-{mode}")
    cp = start_extra_cp(cluster, pki, signing_key, work, mode, extra)
    try:
        yield Revoking(cp, pod_bound, LIVENESS_TTL)
    finally:
        cp.stop()


def deleted(cluster: Cluster, path: str) -> None:
    """DELETE an object straight through the API (no kubectl process start in the timing);
    a pod without a node is gone at once."""
    resp = cluster.request("DELETE", path)
    assert resp.status_code == 200, resp.text
    assert cluster.request("GET", path).status_code == 404


def unlabelled(cluster: Cluster, path: str, key: str) -> None:
    """Remove a label as the control plane (the only identity the admission policy lets
    change the ServiceAccount label)."""
    resp = cluster.request(
        "PATCH",
        path,
        as_user=CONTROL_PLANE,
        body={"metadata": {"labels": {key: None}}},
        patch="merge",
    )
    assert resp.status_code == 200, resp.text
    assert key not in resp.json()["metadata"].get("labels", {})


def refused_within(
    cp: CpServer, token: str, revoke: Callable[[], object], bound: float
) -> tuple[float, int, str]:
    """Ask for a while (caches warm, mid-life), revoke, keep asking: the time from the start
    of the revocation to the first refusal, its status and its ``error``. Every answer before
    it is 200, none is a 5xx, and the refusal is final."""
    warm_until = time.monotonic() + LIVENESS_TTL * 0.75
    while time.monotonic() < warm_until:
        resp = cp.get_token(token)
        assert resp.status_code == 200, resp.text
        time.sleep(POLL)
    start = time.monotonic()
    revoke()
    while True:
        resp = cp.get_token(token)
        elapsed = time.monotonic() - start
        assert resp.status_code < 500, resp.text
        if resp.status_code != 200:
            break
        assert elapsed <= bound + SLACK, f"still served {elapsed:.2f} s after the revocation"
        time.sleep(POLL)
    refusal = resp.status_code, resp.json()["error"]
    for _ in range(3):  # final: it does not come back
        again = cp.get_token(token)
        assert again.status_code in (401, 403), again.text
    return elapsed, *refusal


def test_a_deleted_pods_token_is_refused_within_the_bound(
    cluster: Cluster, revoking: Revoking
) -> None:
    cp = revoking.cp
    session = make_session(cluster, f"rvpod{cp.mode[:4]}")
    token = pod_token(cluster, session)
    elapsed, status, error = refused_within(
        cp,
        token,
        lambda: deleted(cluster, f"/api/v1/namespaces/{session.namespace}/pods/{session.pod}"),
        revoking.pod_bound,
    )
    assert (status, error) == (401, "invalid_token")
    assert elapsed <= revoking.pod_bound + SLACK
    # the API server agrees: the token no longer authenticates, once its own success cache
    # lets go of it (10 s after the CP's last review of it: with tokenreview the CP refuses
    # first, since it reads the pod itself)
    deadline = time.monotonic() + 10 + SLACK
    while cluster.token_review(token, ["ambient-cp"])["status"].get("authenticated"):
        assert time.monotonic() < deadline, "the API server still authenticates the token"
        time.sleep(POLL)


def test_the_api_server_itself_caches_a_review_for_10_s(
    cluster: Cluster, injector: Injector
) -> None:
    """What a TokenReview says after the bound pod is deleted: still authenticated for about
    10 s (kube-apiserver's token success cache), then "invalidated"."""
    session = make_session(cluster, "rvapiserver")
    token = pod_token(cluster, session)
    assert cluster.token_review(token, ["ambient-cp"])["status"]["authenticated"] is True
    start = time.monotonic()
    deleted(cluster, f"/api/v1/namespaces/{session.namespace}/pods/{session.pod}")
    while True:
        status = cluster.token_review(token, ["ambient-cp"])["status"]
        elapsed = time.monotonic() - start
        if not status.get("authenticated"):
            break
        assert elapsed < 20, "a deleted pod's token authenticated for 20 s"
        time.sleep(POLL)
    assert "invalidated" in status["error"]
    assert 8 <= elapsed <= 12, elapsed


def test_a_deleted_serviceaccounts_token_is_refused_within_the_bound(
    cluster: Cluster, revoking: Revoking
) -> None:
    cp = revoking.cp
    session = make_session(cluster, f"rvsa{cp.mode[:4]}")
    token = pod_token(cluster, session)
    elapsed, status, error = refused_within(
        cp,
        token,
        lambda: deleted(
            cluster,
            f"/api/v1/namespaces/{session.namespace}/serviceaccounts/{session.service_account}",
        ),
        revoking.pod_bound,
    )
    # not authenticated any more (401), or no longer a managed ServiceAccount (403):
    # whichever cache expires first
    assert (status, error) in ((401, "invalid_token"), (403, "access_denied"))
    assert elapsed <= revoking.pod_bound + SLACK


def test_removing_the_namespace_label_is_honoured_within_the_bound(
    cluster: Cluster, revoking: Revoking
) -> None:
    cp = revoking.cp
    session = make_session(cluster, f"rvns{cp.mode[:4]}")
    token = pod_token(cluster, session)
    elapsed, status, error = refused_within(
        cp,
        token,
        lambda: cluster.kubectl(
            "label",
            "namespace",
            session.namespace,
            "ambient-code.io/managed-",
            as_user=CONTROL_PLANE,
        ),
        revoking.label_bound,
    )
    assert (status, error) == (403, "access_denied")
    assert elapsed <= revoking.label_bound + SLACK


def test_removing_the_serviceaccount_label_is_honoured_within_the_bound(
    cluster: Cluster, revoking: Revoking
) -> None:
    cp = revoking.cp
    session = make_session(cluster, f"rvsal{cp.mode[:4]}")
    token = pod_token(cluster, session)
    elapsed, status, error = refused_within(
        cp,
        token,
        lambda: unlabelled(
            cluster,
            f"/api/v1/namespaces/{session.namespace}/serviceaccounts/{session.service_account}",
            "ambient-code.io/managed-by",
        ),
        revoking.label_bound,
    )
    assert (status, error) == (403, "access_denied")
    assert elapsed <= revoking.label_bound + SLACK
