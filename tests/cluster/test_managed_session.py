"""Flow 1: a managed session for real, in both authn modes.

Namespace and ServiceAccount labelled by the control plane; a pod created with the opt-in
label and mutated by the injector through the API server's webhook machinery; the pod read
back after the server's own defaulting and validation; a pod-bound token from TokenRequest; a
sidecar process with that token file and exactly the injected environment; a runner's
``GET /token`` through it; the minted JWT verified against the CP's JWKS. Also
``cp-token get`` straight to the CP, and a token exchange through google-auth.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import urllib3
from google.auth import identity_pool
from google.auth.transport.urllib3 import Request as GoogleRequest
from joserfc import jwt
from joserfc.jwk import KeySet

from cp_token.runtime.processes import Proc, clean_env, free_port

from .cluster import ROOT, Cluster
from .session import CP_AUDIENCE, CpServer, Injector, Session, make_session, sidecar_env

GUARD = {"Ambient-Token-Request": "true"}
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


def verify(cp: CpServer, token: str) -> dict[str, Any]:
    """The claims of a token the CP minted, verified against its published JWKS."""
    with cp.client() as c:
        jwks = c.get("/.well-known/jwks.json").json()
    keys = KeySet.import_key_set(jwks)
    return dict(jwt.decode(token, keys, algorithms=["ES256", "RS256"]).claims)


def _container(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    return next(c for c in pod["spec"].get(key, []) if c["name"] == name)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def assert_injected_as_specified(pod: dict[str, Any], injector: Injector) -> None:
    """The stored pod (after the API server's defaulting and validation) holds the native
    sidecar exactly as documented."""
    inits = pod["spec"]["initContainers"]
    assert inits[0]["name"] == "cp-token-sidecar", "the sidecar comes first"
    side = inits[0]
    assert side["restartPolicy"] == "Always"
    assert side["command"] == ["cp-token-sidecar"]
    env = _env(side)
    assert env["AMBIENT_CP_TOKEN_URL"] == injector.cp_url
    assert env["SIDECAR_LISTEN_ADDR"] == "127.0.0.1:8099"
    assert env["AMBIENT_SA_TOKEN_FILE"] == "/var/run/secrets/tokens/ambient-cp"
    assert env["SIDECAR_TOKEN_FILE"] == "/var/run/ambient/token"
    assert env["SIDECAR_METRICS_ADDR"] == "0.0.0.0:9099"
    assert env["AMBIENT_CP_CA_FILE"] == "/var/run/ambient-ca/ca.crt"
    assert side["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert side["startupProbe"]["httpGet"]["port"] == 9099
    assert side["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert side["resources"]["requests"] and side["resources"]["limits"]
    sc = side["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    mounts = {m["name"]: m for m in side["volumeMounts"]}
    assert mounts["cp-token-sa"]["mountPath"] == "/var/run/secrets/tokens"
    assert mounts["cp-token-sa"]["readOnly"] is True
    assert mounts["cp-token-file"]["mountPath"] == "/var/run/ambient"
    assert mounts["cp-token-tmp"]["mountPath"] == "/tmp"
    assert mounts["cp-token-ca"]["mountPath"] == "/var/run/ambient-ca"
    assert mounts["cp-token-ca"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    projected = volumes["cp-token-sa"]["projected"]["sources"][0]["serviceAccountToken"]
    assert projected == {"audience": CP_AUDIENCE, "expirationSeconds": 3600, "path": "ambient-cp"}
    assert volumes["cp-token-file"]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes["cp-token-tmp"]
    assert volumes["cp-token-ca"]["configMap"]["name"] == "cp-token-ca"
    runner = _container(pod, "runner")
    renv = _env(runner)
    assert renv["AMBIENT_TOKEN_SIDECAR_URL"] == "http://127.0.0.1:8099/token"
    assert renv["AMBIENT_TOKEN_FILE"] == "/var/run/ambient/token"
    rmounts = {m["name"]: m for m in runner.get("volumeMounts", [])}
    assert rmounts["cp-token-file"] == {
        "name": "cp-token-file",
        "mountPath": "/var/run/ambient",
        "readOnly": True,
    }
    # the projected SA token is the sidecar's alone
    assert "cp-token-sa" not in rmounts


def test_the_stored_pod_holds_the_injected_native_sidecar(
    cluster: Cluster, injector: Injector
) -> None:
    session = make_session(cluster, "inj")
    assert_injected_as_specified(session.pod_object, injector)
    # the API server's own defaulting ran after the patch (the sidecar got the defaults a
    # real container gets), and the ServiceAccount admission plugin left the pod alone
    side = session.pod_object["spec"]["initContainers"][0]
    assert side["terminationMessagePolicy"] == "File"
    assert side["imagePullPolicy"] in ("IfNotPresent", "Always")
    assert injector.requests("mutated") >= 1


def test_the_example_session_is_admitted_and_injected(
    cluster: Cluster, injector: Injector, example_session: str
) -> None:
    pod = cluster.get("/api/v1/namespaces/session-demo/pods/runner-demo")
    assert_injected_as_specified(pod, injector)


def _run_sidecar(
    cluster: Cluster, session: Session, cp_ca: Path, token: str, work: Path
) -> tuple[Proc, str, Path]:
    sa_dir, file_dir, ca_dir = work / "sa", work / "file", work / "ca"
    for d in (sa_dir, file_dir, ca_dir):
        d.mkdir(parents=True, exist_ok=True)
    (sa_dir / "ambient-cp").write_text(token)
    (ca_dir / "ca.crt").write_bytes(cp_ca.read_bytes())
    port, mport = free_port(), free_port()
    env = sidecar_env(
        session.pod_object,
        {
            "/var/run/secrets/tokens": sa_dir,
            "/var/run/ambient-ca": ca_dir,
            "/var/run/ambient": file_dir,
        },
        port=port,
        metrics_port=mport,
    )
    proc = Proc([sys.executable, "-m", "sidecar"], env, work / "sidecar.log", cwd=ROOT)
    proc.wait_http(f"http://127.0.0.1:{mport}/readyz", deadline=30)
    return proc, f"http://127.0.0.1:{port}", file_dir / "token"


def test_a_runner_gets_a_token_through_the_injected_sidecar(
    cluster: Cluster, cp: CpServer, tmp_path: Path
) -> None:
    session = make_session(cluster, f"run{cp.mode[:4]}")
    token = cluster.create_token(
        session.namespace, session.service_account, audience=CP_AUDIENCE, pod=session.pod
    )
    proc, base, token_file = _run_sidecar(cluster, session, cp.ca_file, token, tmp_path)
    try:
        resp = httpx.get(f"{base}/token", headers=GUARD, trust_env=False, timeout=10)
        assert resp.status_code == 200, resp.text
        minted = resp.json()["token"]
        assert token_file.read_text() == minted
        claims = verify(cp, minted)
        user = f"system:serviceaccount:{session.namespace}:{session.service_account}"
        assert claims["sub"] == user
        assert claims["pod"] == session.pod
        assert claims["namespace"] == session.namespace
        assert claims["service_account"] == session.service_account
        assert claims["session_id"] == session.service_account[len("session-") : -len("-sa")]
        assert 0 < claims["exp"] - time.time() <= 900
    finally:
        assert proc.stop() == 0
    assert token not in proc.output() and token[-16:] not in proc.output()


def test_cp_token_get_straight_to_the_cp(cluster: Cluster, cp: CpServer, tmp_path: Path) -> None:
    session = make_session(cluster, f"get{cp.mode[:4]}")
    token = cluster.create_token(
        session.namespace, session.service_account, audience=CP_AUDIENCE, pod=session.pod
    )
    sa_file = tmp_path / "ambient-cp"
    sa_file.write_text(token)
    env = clean_env(
        {
            "AMBIENT_CP_TOKEN_URL": f"{cp.base}/token",
            "AMBIENT_SA_TOKEN_FILE": str(sa_file),
            "AMBIENT_CP_CA_FILE": str(cp.ca_file),
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "cp_token", "get"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    claims = verify(cp, done.stdout.strip())
    assert claims["pod"] == session.pod


def test_a_token_exchange_through_google_auth(
    cluster: Cluster, cp: CpServer, tmp_path: Path
) -> None:
    session = make_session(cluster, f"gauth{cp.mode[:4]}")
    sa_file = tmp_path / "ambient-cp"
    sa_file.write_text(
        cluster.create_token(
            session.namespace, session.service_account, audience=CP_AUDIENCE, pod=session.pod
        )
    )
    config = {
        "type": "external_account",
        "audience": "ambient-api-server",
        "subject_token_type": JWT_TYPE,
        "token_url": f"{cp.base}/oauth2/token",
        "credential_source": {"file": str(sa_file)},
    }
    config_file = tmp_path / "credential-config.json"
    config_file.write_text(json.dumps(config))
    credentials = identity_pool.Credentials.from_file(str(config_file))
    credentials.refresh(GoogleRequest(urllib3.PoolManager(ca_certs=str(cp.ca_file))))
    assert credentials.valid
    claims = verify(cp, credentials.token)
    assert claims["pod"] == session.pod and claims["aud"] == "ambient-api-server"
