"""Start the product's commands as real processes on loopback; stop them by pid.

The helpers are :mod:`cp_token.runtime.processes` (shared with ``cp-token dev`` and the benches);
this module adds the repository root and the commands the tests start.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from cp_token.runtime import processes
from cp_token.runtime.processes import clean_env, free_port

__all__ = [
    "ROOT",
    "Proc",
    "clean_env",
    "cp_serve",
    "free_port",
    "run_cmd",
    "sidecar_serve",
    "write_identities",
]

ROOT = Path(__file__).resolve().parents[2]


class Proc(processes.Proc):
    """A command run from the repository root, its output captured to ``log``."""

    def __init__(self, args: list[str], env: Mapping[str, str], log: Path) -> None:
        super().__init__(args, env, log, cwd=ROOT)


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
