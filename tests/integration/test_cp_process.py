"""``cp-token serve`` as a real process: kubeconfig, statuses, drain, TLS, config errors."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import trustme
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.fakes.fixtures import SESSION_NS, SESSION_POD, SESSION_SA
from tests.fakes.idp import FakeIdP
from tests.fakes.kube_apiserver import FakeKubeAPIServer
from tests.integration.procs import cp_serve, run_cmd, write_identities

RUNNER = f"system:serviceaccount:{SESSION_NS}:{SESSION_SA}"


def get(base: str, token: str | None, **kw: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{base}/token", headers=headers, trust_env=False, timeout=15, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("authn", ["tokenreview", "jwks"])
def test_serve_against_a_cluster_by_kubeconfig(
    kube_apiserver: FakeKubeAPIServer, kubeconfig: Path, tmp_path: Path, authn: str
) -> None:
    proc, base, metrics = cp_serve(
        {"KUBECONFIG": str(kubeconfig), "CP_TOKEN_AUTHN": authn, "CP_TOKEN_MINTER": "jwt"},
        tmp_path / "cp.log",
    )
    try:
        proc.wait_http(f"{metrics}/readyz")
        sa_token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
        resp = get(base, sa_token)
        assert resp.status_code == 200, resp.text
        assert resp.headers["cache-control"] == "no-store"
        issued = resp.json()["token"]
        keys = KeySet.import_key_set(
            httpx.get(f"{base}/.well-known/jwks.json", trust_env=False).json()
        )
        claims = jwt.decode(issued, keys).claims
        assert claims["sub"] == RUNNER and claims["pod"] == SESSION_POD
        assert claims["session_id"] == "abc"

        unbound = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA)
        assert get(base, unbound).status_code == 403
        assert get(base, "garbage").status_code == 401
        assert get(base, None).headers["www-authenticate"] == "Bearer"
        assert httpx.head(f"{base}/token", trust_env=False).status_code == 405

        text = httpx.get(f"{metrics}/metrics", trust_env=False).text
        assert 'cp_token_requests_total{outcome="issued",reason="ok"} 1.0' in text
        assert "cp_token_build_info" in text
        assert "cp_token_kube_api_calls_total" in text
        assert RUNNER not in text and SESSION_POD not in text
        assert "/token" not in httpx.get(f"{metrics}/metrics", trust_env=False).url.path
        assert httpx.get(f"{metrics}/token", trust_env=False).status_code == 404
    finally:
        code = proc.terminate()
    out = proc.output()
    assert code == 0, out
    for secret in (sa_token, issued, "cp-sa-token"):
        assert secret not in out and secret[-16:] not in out
    audit = [json.loads(line) for line in out.splitlines() if '"event":"token_request"' in line]
    assert [a["outcome"] for a in audit][:1] == ["issued"]
    assert set(audit[0]) == {
        "ts",
        "event",
        "outcome",
        "reason",
        "username",
        "namespace",
        "pod",
        "jti",
        "latency_ms",
    }
    assert audit[0]["jti"] == claims["jti"]
    config_line = next(json.loads(line) for line in out.splitlines() if "configured" in line)
    assert config_line["config"]["authn"] == authn


def test_sigterm_drains_in_flight_requests(
    kube_apiserver: FakeKubeAPIServer, kubeconfig: Path, tmp_path: Path
) -> None:
    proc, base, metrics = cp_serve(
        {"KUBECONFIG": str(kubeconfig), "CP_TOKEN_MINTER": "jwt"}, tmp_path / "cp.log"
    )
    proc.wait_http(f"{metrics}/readyz")
    sa_token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
    kube_apiserver.set_latency(1.5, "tokenreviews")
    result: list[httpx.Response] = []
    t = threading.Thread(target=lambda: result.append(get(base, sa_token)))
    t.start()
    deadline = time.monotonic() + 10
    while kube_apiserver.calls("tokenreviews") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    code = proc.terminate()
    t.join(10)
    assert code == 0, proc.output()
    assert result and result[0].status_code == 200


def test_rbac_refusal_is_503_and_logged(
    kube_apiserver: FakeKubeAPIServer, kubeconfig: Path, tmp_path: Path
) -> None:
    kube_apiserver.deny("create", "authentication.k8s.io", "tokenreviews")
    proc, base, metrics = cp_serve(
        {"KUBECONFIG": str(kubeconfig), "CP_TOKEN_MINTER": "jwt"}, tmp_path / "cp.log"
    )
    try:
        proc.wait_http(f"{metrics}/readyz")  # missing RBAC is not a readiness failure
        sa_token = kube_apiserver.issue_bound_token(SESSION_NS, SESSION_SA, pod=SESSION_POD)
        resp = get(base, sa_token)
        assert resp.status_code == 503
        assert int(resp.headers["retry-after"]) >= 1
    finally:
        proc.terminate()
    out = proc.output()
    assert "may NOT create tokenreviews" in out and "CP_TOKEN_AUTHN=jwks" in out


def test_oidc_minter_readiness(idp: FakeIdP, tmp_path: Path) -> None:
    ids = write_identities(tmp_path / "ids.json", "dev", RUNNER, "p")
    secret = tmp_path / "secret"
    secret.write_text("wrong-secret")
    env = {
        "CP_TOKEN_AUTHN": "static",
        "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ids),
        "CP_TOKEN_MINTER": "oidc",
        "OIDC_TOKEN_URL": idp.token_url,
        "OIDC_CLIENT_ID": idp.client_id,
        "OIDC_CLIENT_SECRET_FILE": str(secret),
    }
    proc, base, metrics = cp_serve(env, tmp_path / "cp.log")
    try:
        # the IdP rejects the credentials: a permanent misconfiguration, readiness says why
        proc.wait_http(f"{metrics}/readyz", status=503)
        body = httpx.get(f"{metrics}/readyz", trust_env=False).text
        # a reason class only: the probe port is reachable from the network (SPEC)
        assert body == "not ready: invalid_client"
        assert get(base, "dev").status_code == 503
        # the Secret is rotated: picked up without a restart
        secret.write_text(idp.client_secret)
        proc.wait_http(f"{metrics}/readyz", deadline=20)
        resp = get(base, "dev")
        assert resp.status_code == 200 and idp.is_issued(resp.json()["token"])
        # a transient IdP outage never turns readiness off
        idp.fail("500")
        time.sleep(0.5)
        assert httpx.get(f"{metrics}/readyz", trust_env=False).status_code == 200
        assert get(base, "dev").status_code == 200  # still served from cache
    finally:
        assert proc.terminate() == 0


def test_https_and_certificate_rotation(tmp_path: Path) -> None:
    ca = trustme.CA()
    first, second = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first.cert_chain_pems[0].write_to_path(str(cert))
    first.private_key_pem.write_to_path(str(key))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    env = {
        "CP_TOKEN_AUTHN": "static",
        "CP_TOKEN_STATIC_IDENTITIES_FILE": str(tmp_path / "ids.json"),
        "CP_TOKEN_MINTER": "static",
        "CP_TOKEN_STATIC_TOKEN": "static-api-token",
        "CP_TOKEN_TLS_CERT_FILE": str(cert),
        "CP_TOKEN_TLS_KEY_FILE": str(key),
    }
    (tmp_path / "ids.json").write_text('{"identities": []}')
    proc, base, metrics = cp_serve(env, tmp_path / "cp.log")

    def serial() -> int:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                der = tls.getpeercert(binary_form=True)
        from cryptography import x509

        return x509.load_der_x509_certificate(der or b"").serial_number

    try:
        proc.wait_http(f"{metrics}/readyz")
        assert base.startswith("https://")
        resp = httpx.get(
            f"{base}/healthz",
            verify=ssl.create_default_context(cafile=str(ca_file)),
            trust_env=False,
        )
        assert resp.status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/healthz", trust_env=False)  # not trusted without the CA
        before = serial()
        second.private_key_pem.write_to_path(str(key))
        second.cert_chain_pems[0].write_to_path(str(cert))
        deadline = time.monotonic() + 15
        while serial() == before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert serial() != before
    finally:
        assert proc.terminate() == 0


def test_static_token_file_is_reread(tmp_path: Path) -> None:
    ids = write_identities(tmp_path / "ids.json", "dev", RUNNER, "p")
    # a Kubernetes Secret volume: the file is a symlink through a swapped ..data link
    data1 = tmp_path / "..2026_1"
    data1.mkdir()
    (data1 / "token").write_text("first-token\n")
    (tmp_path / "..data").symlink_to(data1.name)
    (tmp_path / "token").symlink_to("..data/token")
    env = {
        "CP_TOKEN_AUTHN": "static",
        "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ids),
        "CP_TOKEN_MINTER": "static",
        "CP_TOKEN_STATIC_TOKEN_FILE": str(tmp_path / "token"),
    }
    proc, base, metrics = cp_serve(env, tmp_path / "cp.log")
    try:
        proc.wait_http(f"{metrics}/readyz")
        body = get(base, "dev").json()
        assert body["token"] == "first-token"
        assert body["expires_at"] is None and body["expires_in"] is None
        data2 = tmp_path / "..2026_2"
        data2.mkdir()
        (data2 / "token").write_text("second-token\n")
        (tmp_path / "..data_tmp").symlink_to(data2.name)
        (tmp_path / "..data_tmp").rename(tmp_path / "..data")
        shutil.rmtree(data1)
        deadline = time.monotonic() + 15
        while get(base, "dev").json()["token"] != "second-token" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert get(base, "dev").json()["token"] == "second-token"
    finally:
        assert proc.terminate() == 0


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"CP_TOKEN_MINTER": "nope"}, "CP_TOKEN_MINTER"),
        ({"CP_TOKEN_MINTER": "oidc"}, "OIDC_TOKEN_URL"),
        (
            {"CP_TOKEN_MINTER": "jwt", "CP_TOKEN_SIGNING_KEY_FILE": "/nonexistent"},
            "CP_TOKEN_SIGNING_KEY_FILE",
        ),
        ({"CP_TOKEN_MINTER": "jwt", "CP_TOKEN_URL": "http//bad"}, "CP_TOKEN_URL"),
        ({"CP_TOKEN_MINTER": "jwt", "CP_TOKEN_TTL": "100"}, "CP_TOKEN_TTL"),
        ({"CP_TOKEN_MINTER": "jwt", "KUBECONFIG": "/nonexistent/kubeconfig"}, "KUBECONFIG"),
        ({"CP_TOKEN_MINTER": "jwt", "CP_TOKEN_AUDIENCES": ""}, "CP_TOKEN_AUDIENCES"),
    ],
)
def test_config_errors_exit_2_with_one_line(env: dict[str, str], variable: str) -> None:
    full = {
        "CP_TOKEN_URL": "http://127.0.0.1:1/token",
        "CP_TOKEN_LISTEN_ADDR": "127.0.0.1:0",
        "CP_TOKEN_METRICS_ADDR": "127.0.0.1:0",
        **env,
    }
    result = run_cmd([sys.executable, "-m", "cp_token", "serve"], full)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] and "Traceback" not in result.stderr


def test_a_file_that_is_not_a_kubeconfig_says_so(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("just some text\n")
    env = {
        "CP_TOKEN_URL": "http://127.0.0.1:1/token",
        "CP_TOKEN_LISTEN_ADDR": "127.0.0.1:0",
        "CP_TOKEN_METRICS_ADDR": "127.0.0.1:0",
        "CP_TOKEN_MINTER": "jwt",
        "KUBECONFIG": str(kubeconfig),
    }
    result = run_cmd([sys.executable, "-m", "cp_token", "serve"], env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "KUBECONFIG: " in lines[0], result.stderr
    assert "not a kubeconfig" in lines[0]


def test_sidecar_and_client_verify_an_https_cp_with_their_ca_file(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    ids = write_identities(tmp_path / "ids.json", "sa-dev", RUNNER, "p")
    sa_file = tmp_path / "sa"
    sa_file.write_text("sa-dev")
    env = {
        "CP_TOKEN_AUTHN": "static",
        "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ids),
        "CP_TOKEN_MINTER": "jwt",
        "CP_TOKEN_TLS_CERT_FILE": str(cert),
        "CP_TOKEN_TLS_KEY_FILE": str(key),
    }
    proc, base, metrics = cp_serve(env, tmp_path / "cp.log")
    try:
        proc.wait_http(f"{metrics}/readyz")
        client_env = {
            "AMBIENT_CP_TOKEN_URL": f"{base}/token",
            "AMBIENT_SA_TOKEN_FILE": str(sa_file),
        }
        cp_token = str(Path(sys.executable).parent / "cp-token")
        untrusted = run_cmd([cp_token, "get"], client_env)
        assert untrusted.returncode == 1 and "AMBIENT_CP_CA_FILE" in untrusted.stderr
        got = run_cmd([cp_token, "get"], {**client_env, "AMBIENT_CP_CA_FILE": str(ca_file)})
        assert got.returncode == 0, got.stderr
        assert got.stdout.strip().count(".") == 2
        out_file = tmp_path / "token"
        once = run_cmd(
            [sys.executable, "-m", "sidecar", "--once"],
            {**client_env, "AMBIENT_CP_CA_FILE": str(ca_file), "SIDECAR_TOKEN_FILE": str(out_file)},
        )
        assert once.returncode == 0, once.stderr
        assert out_file.read_text().count(".") == 2
    finally:
        assert proc.terminate() == 0
