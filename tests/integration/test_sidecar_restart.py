"""A ``cp-token-sidecar`` restarted during a CP outage, as a real process: the token file
an earlier run left is kept only while it is a JWT whose ``exp`` is in the future (served,
then removed at that expiry); anything else there is removed at once. Before: the file was
left as it was (an expired token still there 21.6 s past its expiry)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.procs import free_port, sidecar_serve

HEADER = {"Ambient-Token-Request": "true"}


def jwt(exp: float) -> str:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'ES256'})}.{part({'sub': 'session', 'exp': exp})}.c2ln"


@pytest.fixture
def sa_file(tmp_path: Path) -> Path:
    path = tmp_path / "sa"
    path.write_text("sa.jwt.token")
    return path


def poll_until(predicate: object, deadline: float) -> float:
    """Wall time at which ``predicate()`` first held (checked every 20 ms)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return time.time()
        time.sleep(0.02)
    raise AssertionError(f"not within {deadline}s")


def test_an_unexpired_left_token_is_served_and_its_file_goes_at_its_expiry(
    tmp_path: Path, sa_file: Path
) -> None:
    token_file = tmp_path / "token"
    exp = int(time.time()) + 10  # room for a slow start on a loaded machine
    token_file.write_text(jwt(exp))
    down = f"http://127.0.0.1:{free_port()}/token"  # nobody listens: the CP is down
    proc, base = sidecar_serve(
        down, sa_file, tmp_path / "sidecar.log", SIDECAR_TOKEN_FILE=str(token_file)
    )
    try:
        proc.wait_http(f"{base}/readyz", deadline=8)  # ready with the left token
        with httpx.Client(base_url=base, trust_env=False, timeout=5) as http:
            served = http.get("/token", headers=HEADER).json()
            assert served["token"] == jwt(exp)
            assert 0 < served["expires_in"] <= 10
            gone = poll_until(lambda: not token_file.exists(), 15)
            assert gone <= exp + 1.0, gone - exp  # removed at its expiry, not 21.6 s later
            assert http.get("/token", headers=HEADER).status_code == 503
            assert http.get("/readyz").text == "not ready: cp_unavailable"
    finally:
        proc.stop()
    assert jwt(exp) not in proc.output()


@pytest.mark.parametrize("left", ["expired", "opaque"])
def test_anything_else_left_in_the_file_is_removed_at_start(
    tmp_path: Path, sa_file: Path, left: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(jwt(time.time() - 1) if left == "expired" else "opaque-token")
    down = f"http://127.0.0.1:{free_port()}/token"
    proc, base = sidecar_serve(
        down, sa_file, tmp_path / "sidecar.log", SIDECAR_TOKEN_FILE=str(token_file)
    )
    try:
        proc.wait_http(f"{base}/healthz")
        poll_until(lambda: not token_file.exists(), 2)
        assert httpx.get(f"{base}/readyz", trust_env=False).status_code == 503
    finally:
        proc.stop()
