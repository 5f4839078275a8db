"""The CP's API port over HTTPS, as k8s/base serves it: the certificate comes from a Secret
volume (cert-manager's), and a renewal reaches new connections without a restart.

A Secret volume holds ``tls.crt -> ..data/tls.crt`` and ``..data -> ..<timestamp>``; the
kubelet renews it by writing a new timestamped directory and renaming a new ``..data`` link
over the old one (one atomic swap of both files), then deleting the old directory.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import sys
import time
from pathlib import Path

import httpx
import trustme
from cryptography import x509

from tests.integration.procs import cp_serve, run_cmd, write_identities

RUNNER = "system:serviceaccount:session-demo:session-demo-sa"


def write_pair(directory: Path, ca: trustme.CA) -> int:
    """A serving certificate for the CP's loopback address; returns its serial number."""
    leaf = ca.issue_cert("127.0.0.1", "cp-token.ambient-code.svc")
    leaf.cert_chain_pems[0].write_to_path(str(directory / "tls.crt"))
    leaf.private_key_pem.write_to_path(str(directory / "tls.key"))
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


def served_serial(port: int, ca_file: Path) -> int:
    """The serial number of the certificate a new TLS connection is given (verified)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der or b"").serial_number


def test_a_renewed_secret_is_served_to_new_connections_without_a_restart(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    secret = tmp_path / "cp-token-tls"
    secret.mkdir()
    first = secret / "..2026_01_01_00_00_00.1"
    first.mkdir()
    first_serial = write_pair(first, ca)
    (secret / "..data").symlink_to(first.name)
    for name in ("tls.crt", "tls.key"):
        (secret / name).symlink_to(f"..data/{name}")
    write_identities(tmp_path / "ids.json", "sa-token", RUNNER)
    env = {
        "CP_TOKEN_AUTHN": "static",
        "CP_TOKEN_STATIC_IDENTITIES_FILE": str(tmp_path / "ids.json"),
        "CP_TOKEN_MINTER": "static",
        "CP_TOKEN_STATIC_TOKEN": "static-api-token",
        "CP_TOKEN_TLS_CERT_FILE": str(secret / "tls.crt"),
        "CP_TOKEN_TLS_KEY_FILE": str(secret / "tls.key"),
    }
    proc, base, metrics = cp_serve(env, tmp_path / "cp.log")
    try:
        proc.wait_http(f"{metrics}/readyz")  # the probe port stays plain HTTP
        port = int(base.rsplit(":", 1)[1])
        assert base.startswith("https://")
        assert served_serial(port, ca_file) == first_serial

        # the kubelet's renewal: a new directory, then one atomic swap of ..data
        second = secret / "..2026_03_01_00_00_00.2"
        second.mkdir()
        second_serial = write_pair(second, ca)
        (secret / "..data_tmp").symlink_to(second.name)
        (secret / "..data_tmp").rename(secret / "..data")
        shutil.rmtree(first)

        deadline = time.monotonic() + 15
        while served_serial(port, ca_file) != second_serial and time.monotonic() < deadline:
            time.sleep(0.2)
        assert served_serial(port, ca_file) == second_serial
        assert proc.popen.poll() is None  # the same process: no restart

        # and it still answers /token over the new certificate, trusting the same CA
        trusted = ssl.create_default_context(cafile=str(ca_file))
        resp = httpx.get(
            f"{base}/token",
            headers={"Authorization": "Bearer sa-token"},
            verify=trusted,
            trust_env=False,
            timeout=15,
        )
        assert resp.status_code == 200, resp.text
        # a client pointed at the CA through AMBIENT_CP_CA_FILE gets its token
        (tmp_path / "sa").write_text("sa-token")
        client_env = {
            "AMBIENT_CP_TOKEN_URL": f"{base}/token",
            "AMBIENT_SA_TOKEN_FILE": str(tmp_path / "sa"),
        }
        cp_token = str(Path(sys.executable).parent / "cp-token")
        refused = run_cmd([cp_token, "get"], client_env)  # no CA: refused cleanly, exit 1
        assert refused.returncode == 1 and "AMBIENT_CP_CA_FILE" in refused.stderr
        assert "Traceback" not in refused.stderr
        got = run_cmd([cp_token, "get"], {**client_env, "AMBIENT_CP_CA_FILE": str(ca_file)})
        assert got.returncode == 0, got.stderr
        assert got.stdout == "static-api-token\n"
    finally:
        assert proc.terminate() == 0
