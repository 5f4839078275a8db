"""Session fixtures of the cluster tier: a real kube-apiserver with the project's manifests
applied, the injector wired into it as a webhook, and the CP in either authn mode.

``make test-cluster`` builds the binaries once (``tests/cluster/build.sh``) and runs this
tier. Without Go or the module proxy the session fixture fails loudly: it never falls back to
the fake API server.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cp_token.runtime.processes import free_port

from .cluster import ROOT, Cluster, build_tools
from .session import CONTROL_PLANE, CP_NAMESPACE, CP_SERVICE_ACCOUNT, CpServer, Injector

AUTHN_MODES = ("tokenreview", "jwks")
CP_USERNAME = f"system:serviceaccount:{CP_NAMESPACE}:{CP_SERVICE_ACCOUNT}"
StartCp = Callable[..., CpServer]
# What the CP logs when the API server refuses it (a permission it lacks), or audits then.
FORBIDDEN_LOG = re.compile(r"kube_forbidden|may NOT|missing permission|forbidden", re.I)


def refused_by_the_api_server(cp: CpServer) -> list[str]:
    """Evidence that the API server answered the CP 403: metric series and log lines."""
    found = [
        f"{call} -> {result}: {n:g}"
        for (call, result), n in cp.kube_calls().items()
        if result == "403" and n
    ]
    for line in cp.log_lines():
        text = json.dumps(line)
        if FORBIDDEN_LOG.search(text):
            found.append(text[:300])
    return found


def audited_403s(cluster: Cluster, username: str = CP_USERNAME) -> list[str]:
    """Requests of ``username`` the API server answered 403, from its audit log."""
    return [
        f"{e.get('verb')} {e.get('requestURI')}"
        for e in cluster.audit_events(username)
        if e.get("responseStatus", {}).get("code") == 403
    ]


def kustomizations() -> list[Path]:
    """Every folder under k8s/ with a kustomization, the example session last (it needs the
    injector's webhook to be running)."""
    dirs = sorted(p.parent for p in (ROOT / "k8s").glob("*/kustomization.yaml"))
    return sorted(dirs, key=lambda p: p.name == "example-session")


def install_control_plane(cluster: Cluster) -> None:
    """What the control plane's own installation provides (its namespace and identity),
    then the project's kustomizations as they ship, server-side with strict validation."""
    cluster.apply_objects(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": CP_NAMESPACE}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "monitoring"}},
        # cert-manager and trust-manager run there (the operator's prerequisites)
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "cert-manager"}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "ambient-control-plane", "namespace": CP_NAMESPACE},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "ambient-control-plane-test"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cluster-admin",
            },
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": "ambient-control-plane",
                    "namespace": CP_NAMESPACE,
                }
            ],
        },
    )


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """etcd + kube-apiserver on loopback with the CRDs and the control plane installed."""
    c = Cluster(build_tools(), tmp_path_factory.mktemp("cluster"))
    c.start()
    try:
        c.install_crds()
        install_control_plane(c)
        yield c
        # Least privilege over the whole run: the API server never refused the CP's own
        # ServiceAccount (every CP the tier starts with it, every mode, every fault).
        refused = audited_403s(c)
        assert not refused, f"the API server answered the CP 403: {refused[:10]}"
    finally:
        c.stop()


@pytest.fixture(scope="session")
def applied(cluster: Cluster) -> dict[str, str]:
    """Every kustomization under k8s/ but the example session, applied as it ships:
    kubectl's output per folder."""
    out: dict[str, str] = {}
    for d in kustomizations():
        if d.name != "example-session":
            out[d.name] = cluster.apply("-k", str(d))
    return out


@pytest.fixture(scope="session")
def pki(cluster: Cluster) -> trustme.CA:
    """The CA that signs the CP's and the injector's serving certificates (in a cluster:
    cert-manager's CA Issuer), distinct from the API server's."""
    return trustme.CA()


@pytest.fixture(scope="session")
def cp_ca_file(pki: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CP's CA bundle as a file (what the trust-manager Bundle puts in ``ca.crt``)."""
    path = tmp_path_factory.mktemp("cp-ca") / "ca.crt"
    pki.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def cp_port() -> int:
    """One port for the CP in every authn mode, so the injector's CP URL stays right."""
    return free_port()


@pytest.fixture(scope="session")
def injector(
    cluster: Cluster,
    applied: dict[str, str],
    pki: trustme.CA,
    cp_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Injector]:
    """``cp-token inject`` as a process; the MutatingWebhookConfiguration from k8s/injector
    pointed at it (a loopback ``url``) with its ``caBundle`` filled in, as cert-manager's CA
    injector would."""
    work = tmp_path_factory.mktemp("injector")
    inj = Injector.start(cluster, pki, work, cp_url=f"https://127.0.0.1:{cp_port}/token")
    try:
        inj.wire_webhook(base64.b64encode(pki.cert_pem.bytes()).decode())
        yield inj
    finally:
        inj.proc.stop()


@pytest.fixture(scope="session")
def example_session(cluster: Cluster, injector: Injector) -> str:
    """k8s/example-session applied as the control plane (it alone may set the label)."""
    return cluster.apply("-k", str(ROOT / "k8s" / "example-session"), as_user=CONTROL_PLANE)


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The jwt minter's key, shared by every CP the tier starts."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path_factory.mktemp("signing") / "key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


@pytest.fixture(scope="session", params=AUTHN_MODES)
def cp(
    request: pytest.FixtureRequest,
    cluster: Cluster,
    applied: dict[str, str],
    injector: Injector,
    pki: trustme.CA,
    cp_port: int,
    signing_key: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CpServer]:
    """``cp-token serve`` in one authn mode, over TLS, with a kubeconfig holding a token of
    its own ServiceAccount from k8s/base (TokenRequest): exactly the permissions the
    manifests grant."""
    mode: str = request.param
    work = tmp_path_factory.mktemp(f"cp-{mode}")
    server = CpServer.start(cluster, pki, work, mode=mode, port=cp_port, signing_key=signing_key)
    try:
        yield server
        # Least privilege: over the whole run this CP was never refused by the API server
        # (its kube-call metrics by result, its log lines).
        refused = refused_by_the_api_server(server)
        assert not refused, f"the API server refused the {mode} CP: {refused}"
    finally:
        server.stop()


def start_extra_cp(
    cluster: Cluster,
    pki: trustme.CA,
    signing_key: Path,
    work: Path,
    mode: str,
    extra: Mapping[str, str] | None = None,
    token: str | None = None,
) -> CpServer:
    """A CP of its own (own port, own environment) for destructive cases, so the session
    CPs stay intact. ``token``: the kubeconfig's bearer (by default a fresh TokenRequest
    token of ambient-code/cp-token)."""
    return CpServer.start(
        cluster,
        pki,
        work,
        mode=mode,
        port=free_port(),
        signing_key=signing_key,
        extra=extra,
        token=token,
    )


@pytest.fixture
def start_cp(
    cluster: Cluster,
    injector: Injector,
    pki: trustme.CA,
    signing_key: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[StartCp]:
    """``start_cp(mode, extra={...}, token=None)``: :func:`start_extra_cp`; each is stopped
    by its pid at the end of the test."""
    started: list[CpServer] = []

    def start(
        mode: str, extra: Mapping[str, str] | None = None, token: str | None = None
    ) -> CpServer:
        work = tmp_path_factory.mktemp(f"cp-{mode}-extra")
        server = start_extra_cp(cluster, pki, signing_key, work, mode, extra, token)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def pytest_report_header() -> list[str]:
    """Say which tier this is (CI logs)."""
    return [f"cluster tier: real kube-apiserver (python {sys.version.split()[0]})"]
