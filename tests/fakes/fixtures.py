"""Pytest fixtures for the fakes.

Import them from ``tests/conftest.py``:
``from tests.fakes.fixtures import idp, kube_apiserver, kubeconfig``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.idp import FakeIdP
from tests.fakes.kube_apiserver import FakeKubeAPIServer

__all__ = [
    "MANAGED_BY_LABEL",
    "MANAGED_NS_LABEL",
    "SESSION_NS",
    "SESSION_POD",
    "SESSION_SA",
    "idp",
    "kube_apiserver",
    "kubeconfig",
    "new_sessions",
]

SESSION_NS = "session-ns"
SESSION_SA = "session-abc-sa"
SESSION_POD = "runner-abc"
MANAGED_NS_LABEL = {"ambient-code.io/managed": "true"}
MANAGED_BY_LABEL = {"ambient-code.io/managed-by": "ambient-control-plane"}


def new_sessions(kube: FakeKubeAPIServer, n: int, prefix: str) -> list[str]:
    """``n`` new managed sessions in `session-ns` (ServiceAccount `session-<prefix><i>-sa`
    and its runner pod); a pod-bound token of each."""
    tokens = []
    for i in range(n):
        sa, pod = f"session-{prefix}{i}-sa", f"runner-{prefix}{i}"
        kube.add_service_account(SESSION_NS, sa, labels=MANAGED_BY_LABEL)
        kube.add_pod(SESSION_NS, pod, sa)
        tokens.append(kube.issue_bound_token(SESSION_NS, sa, pod=pod))
    return tokens


@pytest.fixture
def kube_apiserver() -> Iterator[FakeKubeAPIServer]:
    """A running fake API server with one managed session: namespace `session-ns`, its
    ServiceAccount `session-abc-sa` and the runner pod `runner-abc`."""
    with FakeKubeAPIServer() as kube:
        kube.add_namespace(SESSION_NS, labels=MANAGED_NS_LABEL)
        kube.add_service_account(SESSION_NS, SESSION_SA, labels=MANAGED_BY_LABEL)
        kube.add_pod(SESSION_NS, SESSION_POD, SESSION_SA)
        yield kube


@pytest.fixture
def kubeconfig(kube_apiserver: FakeKubeAPIServer, tmp_path: Path) -> Path:
    """A kubeconfig file for `kube_apiserver`, with the default caller's token."""
    return kube_apiserver.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def idp() -> Iterator[FakeIdP]:
    """A running fake IdP (plain HTTP) accepting client `cp-token` / `cp-token-secret`."""
    with FakeIdP() as server:
        yield server
