"""Issue 3's acceptance: CP (static authn, jwt minter, short TTL) + sidecar + a runner using
``TokenSource.from_env()`` and ``TokenAuth`` against an API that verifies every token with the
CP's JWKS: several token lifetimes, a CP restart in the middle, zero failed calls; and an
MCP-style consumer of ``SIDECAR_TOKEN_FILE`` that never finds an expired token."""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.integration.procs import Proc, free_port, run_cmd, write_identities

RUNNER = "system:serviceaccount:session-e2e:session-e2e-sa"
SA_TOKEN = "e2e-sa-token"

RUNNER_SCRIPT = """
import os, sys, time, httpx
from cp_token.client import TokenSource, TokenAuth
source = TokenSource.from_env()
end = time.monotonic() + float(os.environ["E2E_SECONDS"])
ok = failed = 0
with httpx.Client(auth=TokenAuth(source), trust_env=False, timeout=5) as api:
    while time.monotonic() < end:
        try:
            r = api.get(os.environ["E2E_API_URL"])
            if r.status_code == 200:
                ok += 1
            else:
                failed += 1
                print("failed", r.status_code, r.text[:200], file=sys.stderr)
        except Exception as exc:
            failed += 1
            print("failed", type(exc).__name__, exc, file=sys.stderr)
        time.sleep(0.1)
print(ok, failed)
sys.exit(1 if failed else 0)
"""


def exp_of(token: str) -> float:
    part = token.split(".")[1]
    return float(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))["exp"])


def test_runner_rides_through_refreshes_and_a_cp_restart(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "key.pem").write_bytes(key)
    ids = write_identities(tmp_path / "ids.json", SA_TOKEN, RUNNER, "runner-e2e")
    (tmp_path / "sa-token").write_text(SA_TOKEN)
    token_file = tmp_path / "shared" / "token"
    token_file.parent.mkdir()
    cp_port, cp_metrics, sc_port, api_port = free_port(), free_port(), free_port(), free_port()
    cp_env = {
        "CP_TOKEN_LISTEN_ADDR": f"127.0.0.1:{cp_port}",
        "CP_TOKEN_METRICS_ADDR": f"127.0.0.1:{cp_metrics}",
        "CP_TOKEN_URL": f"http://127.0.0.1:{cp_port}/token",
        "CP_TOKEN_AUTHN": "static",
        "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ids),
        "CP_TOKEN_MINTER": "jwt",
        "CP_TOKEN_SIGNING_KEY_FILE": str(tmp_path / "key.pem"),
        "CP_TOKEN_TTL": "8",
        "CP_TOKEN_MIN_TTL": "3",
        "CP_TOKEN_RATE_LIMIT": "100/s,100",
    }
    sidecar_env = {
        "AMBIENT_CP_TOKEN_URL": f"http://127.0.0.1:{cp_port}/token",
        "SIDECAR_LISTEN_ADDR": f"127.0.0.1:{sc_port}",
        "AMBIENT_SA_TOKEN_FILE": str(tmp_path / "sa-token"),
        "SIDECAR_TOKEN_FILE": str(token_file),
        "SIDECAR_MIN_TTL": "2",
    }
    api_env = {
        "DEMO_API_LISTEN_ADDR": f"127.0.0.1:{api_port}",
        "DEMO_JWKS_URL": f"http://127.0.0.1:{cp_port}/.well-known/jwks.json",
    }
    procs: list[Proc] = []
    cp = Proc([sys.executable, "-m", "cp_token", "serve"], cp_env, tmp_path / "cp1.log")
    procs.append(cp)
    try:
        cp.wait_http(f"http://127.0.0.1:{cp_metrics}/readyz")
        api = Proc([sys.executable, "examples/demo_api.py"], api_env, tmp_path / "api.log")
        procs.append(api)
        api.wait_http(f"http://127.0.0.1:{api_port}/healthz")
        sidecar = Proc([sys.executable, "-m", "sidecar"], sidecar_env, tmp_path / "sc.log")
        procs.append(sidecar)
        sidecar.wait_http(f"http://127.0.0.1:{sc_port}/readyz")

        # the MCP-style consumer: reads the file, never finds it missing or expired
        problems: list[str] = []
        reads = [0]
        stop = threading.Event()

        def consume() -> None:
            while not stop.is_set():
                try:
                    token = token_file.read_text()
                except FileNotFoundError:
                    problems.append("token file missing")
                else:
                    reads[0] += 1
                    if exp_of(token) <= time.time():
                        problems.append("expired token in file")
                time.sleep(0.05)

        consumer = threading.Thread(target=consume)
        consumer.start()

        # the CP restarts (a rolling update) 5 s into an 18 s run: over two token lifetimes. The
        # outage (1.5 s plus the new CP's start, seconds on a loaded machine) must stay shorter
        # than what a token refreshed at half-life has left, or the file rightly goes away
        def restart() -> None:
            time.sleep(5)
            procs[0].terminate()
            time.sleep(1.5)
            procs[0] = Proc(
                [sys.executable, "-m", "cp_token", "serve"], cp_env, tmp_path / "cp2.log"
            )

        restarter = threading.Thread(target=restart)
        restarter.start()
        result = run_cmd(
            [sys.executable, "-c", RUNNER_SCRIPT],
            {
                "AMBIENT_TOKEN_SIDECAR_URL": f"http://127.0.0.1:{sc_port}/token",
                "E2E_API_URL": f"http://127.0.0.1:{api_port}/whoami",
                "E2E_SECONDS": "18",
            },
            timeout=60,
        )
        restarter.join()
        stop.set()
        consumer.join()
        assert result.returncode == 0, result.stdout + result.stderr
        ok, failed = map(int, result.stdout.split())
        assert failed == 0 and ok > 50
        assert not problems, problems[:5]
        assert reads[0] > 100
        # the sidecar refreshed across lifetimes: the second CP issued tokens too
        assert '"outcome":"issued"' in procs[0].output()
    finally:
        codes = [p.terminate() for p in reversed(procs)]
    assert codes == [0] * len(codes), [p.output()[-2000:] for p in procs]
