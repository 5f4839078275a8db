"""docker-compose.yml's wiring, proven without Docker: each service's command and environment
run as local processes on loopback, with only host names and ports rewritten."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.integration.procs import ROOT, Proc, free_port, run_cmd

HOSTS = ("cp", "demo-api", "127.0.0.1", "0.0.0.0")
ADDR = re.compile(r"(?:(?P<host>cp|demo-api|127\.0\.0\.1|0\.0\.0\.0|localhost))?:(?P<port>\d{4,5})")


def load_compose() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc["services"]  # type: ignore[no-any-return]


class Rewriter:
    """Maps every compose port to a free loopback port; every host to 127.0.0.1."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}

    def port(self, port: str) -> int:
        if port not in self.ports:
            self.ports[port] = free_port()
        return self.ports[port]

    def __call__(self, value: str) -> str:
        return ADDR.sub(lambda m: f"127.0.0.1:{self.port(m.group('port'))}", value)


def command(service: dict[str, Any]) -> list[str]:
    bindir = Path(sys.executable).parent
    cmd = list(service["command"])
    if cmd[0] == "python":
        cmd[0] = sys.executable
    elif (bindir / cmd[0]).exists():
        cmd[0] = str(bindir / cmd[0])
    return cmd


def test_compose_services_are_complete() -> None:
    services = load_compose()
    assert set(services) >= {"cp", "sidecar", "runner", "demo-api"}
    for name, svc in services.items():
        assert isinstance(svc["command"], list), name
        assert all(isinstance(v, str) for v in svc["environment"].values()), name
    assert services["runner"]["network_mode"] == "service:sidecar"
    assert services["runner"]["environment"]["AMBIENT_TOKEN_SIDECAR_URL"].startswith(
        "http://127.0.0.1:"
    )


def test_compose_wiring_end_to_end(tmp_path: Path) -> None:
    services = load_compose()
    rw = Rewriter()
    env = {
        name: {k: rw(v) for k, v in svc["environment"].items()} for name, svc in services.items()
    }
    procs: list[Proc] = []
    try:
        cp = Proc(command(services["cp"]), env["cp"], tmp_path / "cp.log")
        procs.append(cp)
        cp.wait_http(f"http://127.0.0.1:{rw.ports['9090']}/readyz")
        api = Proc(command(services["demo-api"]), env["demo-api"], tmp_path / "api.log")
        procs.append(api)
        api.wait_http(f"http://127.0.0.1:{rw.ports['8001']}/healthz")
        sidecar = Proc(command(services["sidecar"]), env["sidecar"], tmp_path / "sidecar.log")
        procs.append(sidecar)
        sidecar.wait_http(f"http://127.0.0.1:{rw.ports['8099']}/readyz")
        runner_env = {**env["runner"], "DEMO_INTERVAL_SECS": "0.2"}
        result = run_cmd(command(services["runner"]), runner_env, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        assert len(lines) == int(env["runner"]["DEMO_CALLS"]), result.stdout
        assert all("session-dev-sa" in line or "session_id=dev" in line for line in lines), lines
        # the token itself never reaches the runner's output
        token = (ROOT / "examples" / "config" / "sa-token").read_text().strip()
        assert token not in result.stdout + result.stderr
    finally:
        codes = [p.terminate() for p in reversed(procs)]
    assert codes == [0] * len(codes), [p.output() for p in procs]
    assert os.path.exists(ROOT / "docker-compose.yml")
