"""Sealed mode through the real webhook: a pod annotated ``ambient-code.io/token-sidecar-mode:
sealed`` is stored with the sealed spec (after the API server's own defaulting and
validation), and a sidecar run with exactly that environment holds a token from the real CP
but hands it to nobody."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx

from cp_token.runtime.processes import Proc, free_port

from .cluster import ROOT, Cluster
from .session import (
    CP_AUDIENCE,
    SEALED_GRPC_UPSTREAM,
    SEALED_UPSTREAMS,
    CpServer,
    Injector,
    make_session,
    sidecar_env,
)

SEALED = {"ambient-code.io/token-sidecar-mode": "sealed"}
GUARD = {"Ambient-Token-Request": "true"}


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def test_a_sealed_pod_is_stored_with_the_sealed_spec(cluster: Cluster, injector: Injector) -> None:
    session = make_session(cluster, "sealedspec", annotations=SEALED)
    pod = session.pod_object
    side = pod["spec"]["initContainers"][0]
    assert side["name"] == "cp-token-sidecar" and side["restartPolicy"] == "Always"
    env = _env(side)
    assert env["SIDECAR_SEALED"] == "true"
    assert env["SIDECAR_UPSTREAMS"] == SEALED_UPSTREAMS
    assert env["SIDECAR_GRPC_UPSTREAM"] == SEALED_GRPC_UPSTREAM
    assert "SIDECAR_TOKEN_FILE" not in env
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    assert "cp-token-file" not in volumes and {"cp-token-sa", "cp-token-tmp"} <= volumes
    assert all(m["name"] != "cp-token-file" for m in side["volumeMounts"])
    runner = pod["spec"]["containers"][0]
    renv = _env(runner)
    assert renv["AMBIENT_API_URL"] == "http://127.0.0.1:8099/upstream/api"
    assert renv["AMBIENT_GRPC_ADDR"] == "127.0.0.1:8098"
    assert "AMBIENT_TOKEN_SIDECAR_URL" not in renv and "AMBIENT_TOKEN_FILE" not in renv
    # nothing of the sidecar's is mounted in the app container: no token file, no SA token
    assert not [m for m in runner.get("volumeMounts", []) if m["name"].startswith("cp-token")]


def test_a_sealed_sidecar_holds_a_real_token_and_hands_it_to_nobody(
    cluster: Cluster, cp: CpServer, tmp_path: Path
) -> None:
    session = make_session(cluster, f"sealed{cp.mode[:4]}", annotations=SEALED)
    token = cluster.create_token(
        session.namespace, session.service_account, audience=CP_AUDIENCE, pod=session.pod
    )
    sa_dir, ca_dir = tmp_path / "sa", tmp_path / "ca"
    sa_dir.mkdir()
    ca_dir.mkdir()
    (sa_dir / "ambient-cp").write_text(token)
    (ca_dir / "ca.crt").write_bytes(cp.ca_file.read_bytes())
    port, mport, gport = free_port(), free_port(), free_port()
    env = sidecar_env(
        session.pod_object,
        {"/var/run/secrets/tokens": sa_dir, "/var/run/ambient-ca": ca_dir},
        port=port,
        metrics_port=mport,
    )
    env["SIDECAR_GRPC_LISTEN_ADDR"] = f"127.0.0.1:{gport}"
    proc = Proc([sys.executable, "-m", "sidecar"], env, tmp_path / "sidecar.log", cwd=ROOT)
    try:
        proc.wait_http(f"http://127.0.0.1:{mport}/readyz", deadline=60)  # a token is held
        for method in ("GET", "POST"):
            resp = httpx.request(
                method, f"http://127.0.0.1:{port}/token", headers=GUARD, trust_env=False
            )
            assert resp.status_code == 403 and resp.json()["error"] == "sealed"
            assert token not in resp.text
        assert not list(tmp_path.rglob("token"))  # no token file anywhere
    finally:
        proc.stop()
    assert token not in proc.output() and token[-16:] not in proc.output()
