"""The CP's ``oidc`` minter against a misbehaving IdP, as a real process: no malformed
answer stops the CP (before: ``Retry-After: ¹``, 400 digits or ``expires_in: "²"`` killed
the minter's background task and the CP exited 1), and ``/token`` is back within 2.5 s of
the IdP healing (before: 19.8 s)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.fakes.idp import MALFORMED_MODES, FakeIdP
from tests.integration.procs import cp_serve, write_identities
from tests.integration.recovery_rig import oidc_recovery, poll

RUNNER = "system:serviceaccount:session-ns:session-idp-sa"
AUTH = {"Authorization": "Bearer dev"}


def test_the_cp_serves_within_2_5_s_of_the_idp_healing(tmp_path: Path) -> None:
    took, calls = oidc_recovery(tmp_path, outage=12.0)
    assert took <= 2.5, took
    assert calls <= 12 / 0.5 + 2  # still paced: one shared backoff, at least 0.5 s apart


def test_no_malformed_idp_answer_stops_the_cp(idp: FakeIdP, tmp_path: Path) -> None:
    ids = write_identities(tmp_path / "ids.json", "dev", RUNNER, "p")
    env = {
        "CP_TOKEN_AUTHN": "static",
        "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ids),
        "CP_TOKEN_MINTER": "oidc",
        "OIDC_TOKEN_URL": idp.token_url,
        "OIDC_CLIENT_ID": idp.client_id,
        "OIDC_CLIENT_SECRET": idp.client_secret,
        "CP_TOKEN_RATE_LIMIT": "1000/s,1000",
    }
    idp.fail("500")
    proc, base, metrics = cp_serve(env, tmp_path / "cp.log")
    try:
        proc.wait_http(f"{metrics}/readyz")
        with httpx.Client(base_url=base, trust_env=False, timeout=15) as http:
            for mode in sorted(MALFORMED_MODES):
                idp.fail(mode)
                seen = idp.calls()
                poll(lambda: idp.calls() >= seen + 2, 10, f"two calls answered {mode}")
                assert proc.popen.poll() is None, f"{mode}: the CP exited\n{proc.output()[-3000:]}"
                resp = http.get("/token", headers=AUTH)
                assert resp.status_code == 503, (mode, resp.status_code, resp.text[:300])
                assert resp.json()["error"] == "temporarily_unavailable"
            idp.fail(None)
            healed = time.monotonic()
            poll(lambda: http.get("/token", headers=AUTH).status_code == 200, 10, "a token")
            assert time.monotonic() - healed <= 3.0
            token = http.get("/token", headers=AUTH).json()["token"]
            assert idp.is_issued(token)
    finally:
        assert proc.terminate() == 0
    log = proc.output()
    assert "Traceback" not in log and "SECRET" not in log
