"""The product's processes against the real API server, and managed sessions made of real
objects: namespace, ServiceAccount, pod (through the injector's webhook) and its token."""

from __future__ import annotations

import json
import re
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trustme

from cp_token.runtime.processes import Proc, free_port

from .cluster import ROOT, Cluster

__all__ = [
    "CONTROL_PLANE",
    "CP_NAMESPACE",
    "CP_SERVICE_ACCOUNT",
    "CpServer",
    "Injector",
    "Session",
    "kube_calls",
    "make_session",
    "pod_token",
    "sidecar_env",
]

CP_NAMESPACE = "ambient-code"
CP_SERVICE_ACCOUNT = "cp-token"
CONTROL_PLANE = f"system:serviceaccount:{CP_NAMESPACE}:ambient-control-plane"
MANAGED_NS = {"ambient-code.io/managed": "true"}
MANAGED_SA = {"ambient-code.io/managed-by": "ambient-control-plane"}
OPT_IN = {"ambient-code.io/token-sidecar": "true"}
CP_AUDIENCE = "ambient-cp"
SEALED_UPSTREAMS = "api=https://api.example.com/v1,search=https://search.example.com"
SEALED_GRPC_UPSTREAM = "grpc.example.com:443"


def _image_of(kustomization: Path) -> str:
    """The image the kustomization's ``images:`` pins (what the injector injects)."""
    text = kustomization.read_text()
    name = re.search(r"newName:\s*(\S+)", text)
    tag = re.search(r"newTag:\s*\"?([^\s\"]+)", text)
    if name and tag:
        return f"{name.group(1)}:{tag.group(1)}"
    return "cp-token:test"


@dataclass
class Injector:
    """``cp-token inject`` as a process, wired into the API server as its webhook."""

    cluster: Cluster
    proc: Proc
    url: str
    metrics: str
    cp_url: str

    @classmethod
    def start(cls, cluster: Cluster, ca: trustme.CA, work: Path, *, cp_url: str) -> Injector:
        """Start it on free loopback ports with a serving certificate from ``ca``."""
        leaf = ca.issue_cert("127.0.0.1", "cp-token-inject.ambient-code.svc")
        cert, key = work / "tls.crt", work / "tls.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        port, mport = free_port(), free_port()
        env = {
            "CP_TOKEN_INJECT_LISTEN_ADDR": f"127.0.0.1:{port}",
            "CP_TOKEN_METRICS_ADDR": f"127.0.0.1:{mport}",
            "CP_TOKEN_INJECT_TLS_CERT_FILE": str(cert),
            "CP_TOKEN_INJECT_TLS_KEY_FILE": str(key),
            "CP_TOKEN_INJECT_IMAGE": _image_of(ROOT / "k8s" / "injector" / "kustomization.yaml"),
            "CP_TOKEN_INJECT_CP_URL": cp_url,
            "CP_TOKEN_INJECT_CA_CONFIGMAP": "cp-token-ca",
            # what sealed pods' sidecars add the token to (test_sealed.py)
            "CP_TOKEN_INJECT_UPSTREAMS": SEALED_UPSTREAMS,
            "CP_TOKEN_INJECT_GRPC_UPSTREAM": SEALED_GRPC_UPSTREAM,
        }
        proc = Proc([sys.executable, "-m", "cp_token", "inject"], env, work / "inject.log")
        metrics = f"http://127.0.0.1:{mport}"
        proc.wait_http(f"{metrics}/readyz", deadline=30)
        return cls(cluster, proc, f"https://127.0.0.1:{port}/mutate", metrics, cp_url)

    def wire_webhook(self, ca_bundle_b64: str) -> None:
        """Point every webhook of k8s/injector's configuration at this process."""
        cfg = self.cluster.get(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/cp-token-inject"
        )
        ops: list[dict[str, Any]] = []
        for i, hook in enumerate(cfg["webhooks"]):
            if "service" in hook.get("clientConfig", {}):
                ops.append({"op": "remove", "path": f"/webhooks/{i}/clientConfig/service"})
            ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/url", "value": self.url})
            ops.append(
                {
                    "op": "add",
                    "path": f"/webhooks/{i}/clientConfig/caBundle",
                    "value": ca_bundle_b64,
                }
            )
        self.cluster.kubectl(
            "patch",
            "mutatingwebhookconfiguration",
            "cp-token-inject",
            "--type=json",
            f"--patch={json.dumps(ops)}",
        )

    def requests(self, result: str) -> float:
        """``cp_token_inject_requests_total{result=...}`` from its metrics."""
        text = httpx.get(f"{self.metrics}/metrics", timeout=5, trust_env=False).text
        m = re.search(rf'^cp_token_inject_requests_total\{{result="{result}"\}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0


@dataclass
class CpServer:
    """``cp-token serve`` against the real API server, as its own ServiceAccount."""

    proc: Proc
    mode: str
    base: str
    metrics: str
    ca_file: Path
    work: Path

    @classmethod
    def start(
        cls,
        cluster: Cluster,
        ca: trustme.CA,
        work: Path,
        *,
        mode: str,
        port: int,
        signing_key: Path,
        extra: Mapping[str, str] | None = None,
        token: str | None = None,
    ) -> CpServer:
        """Start it over TLS on ``port`` with a kubeconfig holding a TokenRequest token of
        ``ambient-code/cp-token`` (or ``token``)."""
        if token is None:
            token = cluster.create_token(CP_NAMESPACE, CP_SERVICE_ACCOUNT, seconds=86400)
        kubeconfig = cluster.token_kubeconfig(token, work / "kubeconfig")
        leaf = ca.issue_cert("127.0.0.1", f"cp-token.{CP_NAMESPACE}.svc")
        cert, key = work / "tls.crt", work / "tls.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        ca_file = work / "ca.crt"
        ca.cert_pem.write_to_path(str(ca_file))
        mport = free_port()
        env = {
            "KUBECONFIG": str(kubeconfig),
            "CP_TOKEN_AUTHN": mode,
            "CP_TOKEN_MINTER": "jwt",
            "CP_TOKEN_SIGNING_KEY_FILE": str(signing_key),
            "CP_TOKEN_LISTEN_ADDR": f"127.0.0.1:{port}",
            "CP_TOKEN_METRICS_ADDR": f"127.0.0.1:{mport}",
            "CP_TOKEN_URL": f"https://127.0.0.1:{port}/token",
            "CP_TOKEN_TLS_CERT_FILE": str(cert),
            "CP_TOKEN_TLS_KEY_FILE": str(key),
            "CP_TOKEN_LOG_FORMAT": "json",
            **(extra or {}),
        }
        proc = Proc([sys.executable, "-m", "cp_token", "serve"], env, work / "cp.log", cwd=ROOT)
        metrics = f"http://127.0.0.1:{mport}"
        proc.wait_http(f"{metrics}/readyz", deadline=60)
        return cls(proc, mode, f"https://127.0.0.1:{port}", metrics, ca_file, work)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        self.proc.stop()

    def client(self) -> httpx.Client:
        """An httpx client that trusts the CP's CA."""
        return httpx.Client(
            base_url=self.base,
            verify=ssl.create_default_context(cafile=str(self.ca_file)),
            trust_env=False,
        )

    def get_token(self, sa_token: str) -> httpx.Response:
        """``GET /token`` with a ServiceAccount token."""
        with self.client() as c:
            return c.get("/token", headers={"Authorization": f"Bearer {sa_token}"}, timeout=20)

    def metrics_text(self) -> str:
        """The CP's ``/metrics``."""
        return httpx.get(f"{self.metrics}/metrics", timeout=5, trust_env=False).text

    def kube_calls(self) -> dict[tuple[str, str], float]:
        """``cp_token_kube_api_calls_total`` by (call, result), from its metrics."""
        return kube_calls(self.metrics_text())

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        lines = []
        for line in self.proc.output().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                lines.append(doc)
        return lines


@dataclass
class Session:
    """A managed session made of real objects."""

    namespace: str
    service_account: str
    pod: str
    pod_object: dict[str, Any]


def make_session(
    cluster: Cluster,
    sid: str,
    *,
    namespace: str | None = None,
    ns_labels: Mapping[str, str] = MANAGED_NS,
    sa_name: str | None = None,
    sa_labels: Mapping[str, str] = MANAGED_SA,
    pod_labels: Mapping[str, str] = OPT_IN,
    annotations: Mapping[str, str] | None = None,
) -> Session:
    """Namespace and ServiceAccount (labelled by the control plane's identity, which the
    admission policy allows), then a runner pod created as the control plane does: with the
    opt-in label, so the injector's webhook adds the sidecar. Returns the pod as stored."""
    ns = namespace or f"sess-{sid}"
    sa = sa_name or f"session-{sid}-sa"
    cluster.apply_objects(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": dict(ns_labels)},
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": sa, "namespace": ns, "labels": dict(sa_labels)},
            "automountServiceAccountToken": False,
        },
        as_user=CONTROL_PLANE,
    )
    pod = f"runner-{sid}"
    cluster.apply_objects(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod,
                "namespace": ns,
                "labels": {"app.kubernetes.io/name": "runner", **pod_labels},
                "annotations": dict(annotations or {}),
            },
            "spec": {
                "serviceAccountName": sa,
                "automountServiceAccountToken": False,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                "containers": [
                    {
                        "name": "runner",
                        "image": "registry.example.com/runner:1",
                        "command": ["python", "-c", "pass"],
                    }
                ],
            },
        },
        as_user=CONTROL_PLANE,
    )
    obj = cluster.get(f"/api/v1/namespaces/{ns}/pods/{pod}")
    return Session(ns, sa, pod, obj)


def sidecar_env(
    pod: Mapping[str, Any], mounts: Mapping[str, Path], *, port: int, metrics_port: int
) -> dict[str, str]:
    """The injected sidecar's environment as the kubelet would give it, with each mount path
    mapped to a local directory (``mounts``: mount path -> directory) and its loopback ports
    moved to free ones (several sidecars run side by side on this machine)."""
    sidecar = next(
        c for c in pod["spec"].get("initContainers", []) if c["name"] == "cp-token-sidecar"
    )
    env: dict[str, str] = {}
    for var in sidecar.get("env", []):
        value = str(var.get("value", ""))
        for mount_path, local in mounts.items():
            if value.startswith(mount_path + "/") or value == mount_path:
                value = str(local) + value[len(mount_path) :]
        env[var["name"]] = value
    env["SIDECAR_LISTEN_ADDR"] = f"127.0.0.1:{port}"
    env["SIDECAR_METRICS_ADDR"] = f"127.0.0.1:{metrics_port}"
    return env


_KUBE_CALL = re.compile(
    r'^cp_token_kube_api_calls_total\{call="([^"]*)",result="([^"]*)"\} (\S+)$', re.M
)


def kube_calls(metrics_text: str) -> dict[tuple[str, str], float]:
    """``cp_token_kube_api_calls_total`` by (call, result) from a Prometheus text page."""
    return {(m[1], m[2]): float(m[3]) for m in _KUBE_CALL.finditer(metrics_text)}


def pod_token(cluster: Cluster, session: Session, *, seconds: int = 3600) -> str:
    """A TokenRequest token for the session's ServiceAccount, audience ``ambient-cp``, bound
    to its pod (what the kubelet projects into the sidecar)."""
    return cluster.create_token(
        session.namespace,
        session.service_account,
        audience=CP_AUDIENCE,
        pod=session.pod,
        seconds=seconds,
    )
