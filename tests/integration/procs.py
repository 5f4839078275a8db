"""Start the product's commands as real processes on loopback; stop them by pid."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The test's environment without any product variables, plus ``extra``."""
    prefixes = ("CP_TOKEN_", "SIDECAR_", "AMBIENT_", "OIDC_", "KUBECONFIG", "BOT_TOKEN")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


class Proc:
    """A running command with its output captured to a file."""

    def __init__(self, args: list[str], env: Mapping[str, str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        self.popen = subprocess.Popen(
            args, env=clean_env(env), stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_http(self, url: str, deadline: float = 20.0, status: int = 200, **kw: object) -> None:
        end = time.monotonic() + deadline
        last = "no answer"
        with httpx.Client(trust_env=False, timeout=1.0, **kw) as client:  # type: ignore[arg-type]
            while time.monotonic() < end:
                if self.popen.poll() is not None:
                    raise AssertionError(f"exited {self.popen.returncode}:\n{self.output()}")
                try:
                    resp = client.get(url)
                    if resp.status_code == status:
                        return
                    last = f"{resp.status_code} {resp.text[:200]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.05)
        raise AssertionError(f"{url} not {status} in {deadline}s ({last}):\n{self.output()}")

    def terminate(self, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        self._log.close()


def cp_serve(env: Mapping[str, str], log: Path) -> tuple[Proc, str, str]:
    """``cp-token serve`` on free loopback ports; returns (proc, api base, metrics base)."""
    port, mport = free_port(), free_port()
    scheme = "https" if "CP_TOKEN_TLS_CERT_FILE" in env else "http"
    full = {
        "CP_TOKEN_LISTEN_ADDR": f"127.0.0.1:{port}",
        "CP_TOKEN_METRICS_ADDR": f"127.0.0.1:{mport}",
        "CP_TOKEN_URL": f"{scheme}://127.0.0.1:{port}/token",
        **env,
    }
    proc = Proc([sys.executable, "-m", "cp_token", "serve"], full, log)
    metrics = f"http://127.0.0.1:{mport}"
    return proc, f"{scheme}://127.0.0.1:{port}", metrics


def sidecar_serve(cp_url: str, sa_file: Path, log: Path, **extra: str) -> tuple[Proc, str]:
    """``cp-token-sidecar`` towards ``cp_url`` on a free loopback port; returns (proc, base)."""
    port = free_port()
    env = {
        "AMBIENT_CP_TOKEN_URL": cp_url,
        "AMBIENT_SA_TOKEN_FILE": str(sa_file),
        "SIDECAR_LISTEN_ADDR": f"127.0.0.1:{port}",
        **extra,
    }
    return Proc([sys.executable, "-m", "sidecar"], env, log), f"http://127.0.0.1:{port}"


def run_cmd(
    args: list[str], env: Mapping[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=clean_env(env), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def write_identities(path: Path, token: str, username: str, pod: str = "p") -> Path:
    """A static-authn identities file with one pod-bound identity."""
    identity = {
        "token": token,
        "username": username,
        "extra": {
            "authentication.kubernetes.io/pod-name": [pod],
            "authentication.kubernetes.io/pod-uid": [f"uid-{pod}"],
        },
    }
    path.write_text(json.dumps({"identities": [identity]}))
    return path
