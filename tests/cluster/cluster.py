"""A real Kubernetes API server on loopback: etcd and kube-apiserver built from their Go
modules (``tests/cluster/build.sh``), a PKI made here, kubectl to apply the manifests.

There is no kubelet, scheduler or controller manager: pods stay Pending, which is all that
admission, TokenRequest and TokenReview need. Everything runs on 127.0.0.1 and is stopped by
process id.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cp_token.runtime.processes import Proc, free_port

__all__ = ["ISSUER", "Cluster", "ClusterError", "build_tools"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# The ServiceAccount issuer of this cluster (an https URL, so the API server serves OIDC
# discovery); also its default API audience, as on a kubeadm cluster.
ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_GROUP = "system:masters"
# The API server's audit log records every request made by an identity of the control
# plane's namespace (the CP's ServiceAccounts): who asked what, and the status it got.
AUDITED_GROUP = "system:serviceaccounts:ambient-code"
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "Metadata", "userGroups": [AUDITED_GROUP]},
        {"level": "None"},
    ],
}


class ClusterError(RuntimeError):
    """The test cluster could not be built, started or driven."""


def build_tools() -> Path:
    """Run ``build.sh`` (builds once, then cached) and return the cache directory."""
    proc = subprocess.run(
        [str(HERE / "build.sh")], capture_output=True, text=True, timeout=3600, check=False
    )
    if proc.returncode != 0:
        raise ClusterError(f"tests/cluster/build.sh failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def _write_rsa_key(directory: Path, name: str) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv = directory / f"{name}.key"
    pub = directory / f"{name}.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, pub


@dataclass
class Cluster:
    """etcd + kube-apiserver + kubectl, all on loopback, under ``workdir``."""

    tools: Path
    workdir: Path
    apiserver_args: Sequence[str] = ()
    etcd: Proc | None = field(default=None, init=False)
    apiserver: Proc | None = field(default=None, init=False)
    port: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bin = self.tools / "bin"
        self.crds = self.tools / "crds"
        self.pki = self.workdir / "pki"
        self.pki.mkdir(exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = self.pki / "ca.crt"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.ca_key_file = self.pki / "ca.key"
        self.ca.private_key_pem.write_to_path(str(self.ca_key_file))
        serving = self.ca.issue_cert("127.0.0.1", "localhost")
        self.serving_cert = self.pki / "apiserver.crt"
        self.serving_key = self.pki / "apiserver.key"
        serving.cert_chain_pems[0].write_to_path(str(self.serving_cert))
        serving.private_key_pem.write_to_path(str(self.serving_key))
        admin = self.ca.issue_cert("admin", common_name="admin", organization_name=ADMIN_GROUP)
        self.admin_cert = self.pki / "admin.crt"
        self.admin_key = self.pki / "admin.key"
        admin.cert_chain_pems[0].write_to_path(str(self.admin_cert))
        admin.private_key_pem.write_to_path(str(self.admin_key))
        # ServiceAccount signing keys: the first signs; every public key listed is accepted
        # and published in /openid/v1/jwks (key rotation adds one).
        self.sa_key, sa_pub = _write_rsa_key(self.pki, "sa-0")
        self.sa_public_keys: list[Path] = [sa_pub]
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        self.port = free_port()
        self.audit_policy = self.workdir / "audit-policy.json"
        self.audit_policy.write_text(json.dumps(AUDIT_POLICY))
        self.audit_log = self.workdir / "audit.log"
        self.admin_kubeconfig = self.workdir / "admin.kubeconfig"
        self.admin_kubeconfig.write_text(
            json.dumps(
                self.kubeconfig_doc(
                    {
                        "client-certificate": str(self.admin_cert),
                        "client-key": str(self.admin_key),
                    }
                )
            )
        )

    # -- processes -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The API server's base URL."""
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start etcd, then kube-apiserver, and wait until the API server is ready."""
        self.start_etcd()
        self.start_apiserver()

    def start_etcd(self) -> None:
        """etcd on loopback, data under ``workdir/etcd``."""
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        self.etcd = Proc(
            [
                str(self.bin / "etcd"),
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            {},
            self.workdir / "etcd.log",
            name="etcd",
        )
        self.etcd.wait_http(f"{client}/health", deadline=60)

    def apiserver_command(self) -> list[str]:
        """kube-apiserver's command line: a small, real cluster's control plane."""
        args = [
            str(self.bin / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # the kubernetes Service endpoints may not be loopback; nothing here needs them
            "--endpoint-reconciler-type=none",
            f"--secure-port={self.port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={self.serving_cert}",
            f"--tls-private-key-file={self.serving_key}",
            f"--client-ca-file={self.ca_file}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={ISSUER}",
            f"--service-account-signing-key-file={self.sa_key}",
            f"--api-audiences={ISSUER}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=false",
            "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,"
            "MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy",
            "--profiling=false",
            f"--audit-policy-file={self.audit_policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-mode=blocking",
            "--v=1",
        ]
        args += [f"--service-account-key-file={pub}" for pub in self.sa_public_keys]
        args += list(self.apiserver_args)
        return args

    def start_apiserver(self, deadline: float = 120.0) -> None:
        """Start kube-apiserver on ``self.port`` and wait for ``/readyz``."""
        log = self.workdir / "apiserver.log"
        self.apiserver = Proc(self.apiserver_command(), {}, log, name="kube-apiserver")
        self.wait_ready(deadline)

    def wait_ready(self, deadline: float = 120.0) -> None:
        """Poll ``/readyz`` (as the admin) until it answers 200."""
        assert self.apiserver is not None
        self.apiserver.wait_http(
            f"{self.url}/readyz",
            deadline=deadline,
            verify=self.admin_tls(),
        )

    def rotate_signing_key(self) -> None:
        """A new ServiceAccount signing key, the old one still accepted and published (the
        first step of a real rotation): kube-apiserver restarted on the same port and etcd."""
        generation = len(self.sa_public_keys)
        self.sa_key, pub = _write_rsa_key(self.pki, f"sa-{generation}")
        self.sa_public_keys.append(pub)
        self.stop_apiserver()
        self.start_apiserver()

    def stop_apiserver(self) -> None:
        """SIGTERM kube-apiserver and wait for it to exit."""
        if self.apiserver is not None:
            self.apiserver.stop(grace=20)

    def freeze_apiserver(self) -> None:
        """SIGSTOP: the API server hangs with its sockets open."""
        assert self.apiserver is not None
        os.kill(self.apiserver.pid, signal.SIGSTOP)

    def thaw_apiserver(self) -> None:
        """SIGCONT after :meth:`freeze_apiserver`."""
        assert self.apiserver is not None
        os.kill(self.apiserver.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop everything (API server first)."""
        if self.apiserver is not None:
            if self.apiserver.popen.poll() is None:
                os.kill(self.apiserver.pid, signal.SIGCONT)
            self.apiserver.stop(grace=20)
        if self.etcd is not None:
            self.etcd.stop(grace=10)

    def audit_events(self, username: str | None = None) -> list[dict[str, Any]]:
        """The API server's audit events so far (ResponseComplete/Panic stages) of
        ``AUDITED_GROUP``'s identities, or only of ``username``."""
        if not self.audit_log.exists():
            return []
        events = []
        for line in self.audit_log.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line being written
            if event.get("stage") not in ("ResponseComplete", "Panic"):
                continue
            if username is None or event.get("user", {}).get("username") == username:
                events.append(event)
        return events

    # -- identities and configuration ------------------------------------------------------

    def kubeconfig_doc(self, user: Mapping[str, Any]) -> dict[str, Any]:
        """A kubeconfig for this cluster with one user."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": "u", "user": dict(user)}],
            "contexts": [{"name": "c", "context": {"cluster": "test", "user": "u"}}],
            "current-context": "c",
        }

    def token_kubeconfig(self, token: str, path: Path) -> Path:
        """A kubeconfig that authenticates with a bearer token (e.g. the CP's own)."""
        path.write_text(json.dumps(self.kubeconfig_doc({"token": token})))
        path.chmod(0o600)
        return path

    # -- kubectl and the API ---------------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        as_user: str | None = None,
        stdin: str | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as the admin (or impersonating ``as_user``)."""
        cmd = [str(self.bin / "kubectl"), f"--kubeconfig={self.admin_kubeconfig}"]
        if as_user:
            cmd.append(f"--as={as_user}")
        cmd += list(args)
        proc = subprocess.run(
            cmd,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(self.workdir)},
            check=False,
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {proc.stderr.strip()[-3000:]}")
        return proc

    def apply(self, *args: str, as_user: str | None = None, stdin: str | None = None) -> str:
        """``kubectl apply --server-side --validate=strict``; returns kubectl's output."""
        return self.kubectl(
            "apply",
            "--server-side",
            "--validate=strict",
            "--field-manager=cluster-tier",
            *args,
            as_user=as_user,
            stdin=stdin,
        ).stdout

    def apply_objects(self, *objects: Mapping[str, Any], as_user: str | None = None) -> str:
        """Apply API objects given as dicts."""
        doc = "\n---\n".join(json.dumps(o) for o in objects)
        return self.apply("-f", "-", as_user=as_user, stdin=doc)

    def client(self, token: str | None = None) -> httpx.Client:
        """An httpx client to the API server: the admin, or a bearer token."""
        if token is None:
            return httpx.Client(
                base_url=self.url, verify=self.admin_tls(), trust_env=False, timeout=30
            )
        return httpx.Client(
            base_url=self.url,
            verify=ssl.create_default_context(cafile=str(self.ca_file)),
            headers={"Authorization": f"Bearer {token}"},
            trust_env=False,
            timeout=30,
        )

    def admin_tls(self) -> ssl.SSLContext:
        """A TLS context that trusts the cluster's CA and presents the admin's certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.admin_cert), str(self.admin_key))
        return ctx

    def request(
        self,
        method: str,
        path: str,
        *,
        as_user: str | None = None,
        as_groups: Sequence[str] = (),
        body: Any = None,
        patch: str | None = None,
    ) -> httpx.Response:
        """One API call as the admin (or impersonating ``as_user``); the response as is.
        ``patch``: the body is a patch of that type (``merge``, ``json``, ``strategic``)."""
        headers: list[tuple[str, str]] = []
        if as_user:
            headers.append(("Impersonate-User", as_user))
            headers += [("Impersonate-Group", g) for g in as_groups]
        content = None
        if body is not None:
            media = {
                None: "application/json",
                "merge": "application/merge-patch+json",
                "json": "application/json-patch+json",
                "strategic": "application/strategic-merge-patch+json",
            }[patch]
            headers.append(("Content-Type", media))
            content = json.dumps(body).encode()
        with self.client() as c:
            return c.request(method, path, headers=headers, content=content)

    def signing_kid(self) -> str:
        """The ``kid`` the API server publishes for :attr:`sa_key` (after a rotation the
        published set holds the old keys too, in no promised order)."""
        private = serialization.load_pem_private_key(self.sa_key.read_bytes(), password=None)
        assert isinstance(private, rsa.RSAPrivateKey)
        n = private.public_key().public_numbers().n
        n_b64 = base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big"))
        wanted = n_b64.rstrip(b"=").decode()
        for jwk in self.get("/openid/v1/jwks")["keys"]:
            if jwk.get("n") == wanted:
                return str(jwk["kid"])
        raise ClusterError("the signing key is not in /openid/v1/jwks")

    def get(self, path: str) -> dict[str, Any]:
        """GET an object as the admin."""
        with self.client() as c:
            resp = c.get(path)
        if resp.status_code != 200:
            raise ClusterError(f"GET {path}: {resp.status_code} {resp.text[:300]}")
        data: dict[str, Any] = resp.json()
        return data

    def create_token(
        self,
        namespace: str,
        service_account: str,
        *,
        audience: str | None = None,
        pod: str | None = None,
        secret: str | None = None,
        seconds: int = 3600,
    ) -> str:
        """A ServiceAccount token from the TokenRequest API (``kubectl create token``),
        optionally bound to a pod or a Secret."""
        args = ["create", "token", service_account, "-n", namespace, f"--duration={seconds}s"]
        if audience:
            args.append(f"--audience={audience}")
        if pod:
            args += ["--bound-object-kind=Pod", f"--bound-object-name={pod}"]
        if secret:
            args += ["--bound-object-kind=Secret", f"--bound-object-name={secret}"]
        return self.kubectl(*args).stdout.strip()

    def token_review(self, token: str, audiences: Sequence[str]) -> dict[str, Any]:
        """POST a TokenReview as the admin; the whole answer."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(audiences)},
        }
        with self.client() as c:
            resp = c.post("/apis/authentication.k8s.io/v1/tokenreviews", json=body)
        data: dict[str, Any] = resp.json()
        return data

    def install_crds(self) -> None:
        """Apply the pinned CRDs and wait until every one is Established."""
        files = sorted(self.crds.glob("*.yaml"))
        if not files:
            raise ClusterError(f"no CRDs under {self.crds}")
        args: list[str] = []
        for f in files:
            args += ["-f", str(f)]
        self.apply(*args)
        # A CRD created a moment ago may have no conditions yet, which `kubectl wait` takes
        # for an error rather than "not yet": ask again until each is Established.
        names = set(self.kubectl("get", "crd", "-o", "name").stdout.split())

        def established() -> bool:
            got = self.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
            ready = {
                f"customresourcedefinition.apiextensions.k8s.io/{crd['metadata']['name']}"
                for crd in got["items"]
                if any(
                    c.get("type") == "Established" and c.get("status") == "True"
                    for c in crd.get("status", {}).get("conditions") or []
                )
            }
            return names <= ready

        self.wait_for("every CRD Established", established, deadline=60)

    def wait_for(self, what: str, predicate: Any, deadline: float = 30.0) -> Any:
        """Poll ``predicate()`` until it returns something truthy; its value."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise ClusterError(f"timed out waiting for {what}")
