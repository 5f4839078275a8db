"""Served sockets set TCP_NODELAY: a keep-alive request is not held ~40 ms by delayed ACKs.

Not a timing benchmark: 40 ms is an order of magnitude above what loopback takes, so the
assertion holds on any machine while catching listeners made without IPPROTO_TCP."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx

from tests.integration.procs import cp_serve, write_identities

RUNNER = "system:serviceaccount:session-a:session-a-sa"


def test_keepalive_requests_are_not_delayed(tmp_path: Path) -> None:
    ids = write_identities(tmp_path / "ids.json", "dev", RUNNER, "p")
    env = {
        "CP_TOKEN_AUTHN": "static",
        "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ids),
        "CP_TOKEN_MINTER": "jwt",
        "CP_TOKEN_RATE_LIMIT": "1000/s,1000",
    }
    proc, base, metrics = cp_serve(env, tmp_path / "cp.log")
    try:
        proc.wait_http(f"{metrics}/readyz")
        with httpx.Client(trust_env=False, timeout=5) as client:  # one keep-alive connection
            times = []
            for _ in range(20):
                start = time.perf_counter()
                assert (
                    client.get(f"{base}/token", headers={"Authorization": "Bearer dev"}).status_code
                    == 200
                )
                times.append(time.perf_counter() - start)
        assert statistics.median(times) < 0.030, times
    finally:
        assert proc.terminate() == 0
