"""``cp-token dev``: the CP and a sidecar on loopback, no cluster, no IdP, no configuration.

The CP runs with static dev identities and the jwt minter (ephemeral key); the sidecar uses a
dev ServiceAccount token file. Ready-to-paste ``curl`` lines are printed, one per line. Ctrl-C
(SIGINT), SIGTERM or SIGHUP stops both processes (one SIGTERM each) and exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

import httpx

__all__ = ["DEV_REFUSED_TOKEN", "DEV_RUNNER_TOKEN", "run_dev"]

DEV_RUNNER_TOKEN = "dev-runner-token"
DEV_REFUSED_TOKEN = "dev-refused-token"
DEV_NAMESPACE = "session-dev"
STARTUP_DEADLINE = 30.0


def _identities() -> dict[str, object]:
    pod = {
        "authentication.kubernetes.io/pod-name": ["runner-dev"],
        "authentication.kubernetes.io/pod-uid": ["00000000-0000-4000-8000-000000000001"],
    }
    return {
        "identities": [
            {
                "token": DEV_RUNNER_TOKEN,
                "username": f"system:serviceaccount:{DEV_NAMESPACE}:session-dev-sa",
                "extra": pod,
            },
            {  # a real pod, but not a session runner's ServiceAccount: refused with 403
                "token": DEV_REFUSED_TOKEN,
                "username": f"system:serviceaccount:{DEV_NAMESPACE}:default",
                "extra": pod,
            },
        ]
    }


def free_port(preferred: int = 0) -> int:
    """``preferred`` if it is free on 127.0.0.1, else any free port."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError("no free port on 127.0.0.1")


def wait_ready(url: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    """Poll ``url`` until it answers 200, the process dies, or the deadline passes."""
    with httpx.Client(trust_env=False, timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: the process exited with code {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"{url} was not ready within {STARTUP_DEADLINE:g} s")


@dataclass
class DevPorts:
    """Where the dev processes listen."""

    cp: int
    cp_metrics: int
    sidecar: int


def curl_lines(ports: DevPorts) -> list[str]:
    """The ready-to-paste commands, one per line, each starting with ``curl``."""
    cp = f"http://127.0.0.1:{ports.cp}"
    return [
        f"curl -s -H 'Ambient-Token-Request: true' http://127.0.0.1:{ports.sidecar}/token",
        f"curl -s -H 'Authorization: Bearer {DEV_RUNNER_TOKEN}' {cp}/token",
        f"curl -s -i -H 'Authorization: Bearer {DEV_REFUSED_TOKEN}' {cp}/token",
        f"curl -s {cp}/.well-known/jwks.json",
    ]


def _stop(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _signals_stop() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a flag (the loop below polls it)."""
    got: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        got.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_dev() -> int:
    """Start CP + sidecar, print the curl lines, wait for Ctrl-C; returns the exit code."""
    workdir = tempfile.mkdtemp(prefix="cp-token-dev-")
    procs: list[subprocess.Popen[bytes]] = []
    with _signals_stop() as stop_signals:
        try:
            ids_file = os.path.join(workdir, "identities.json")
            with open(ids_file, "w") as fh:
                json.dump(_identities(), fh)
            sa_file = os.path.join(workdir, "sa-token")
            with open(sa_file, "w") as fh:
                fh.write(DEV_RUNNER_TOKEN)
            ports = DevPorts(
                cp=free_port(8080), cp_metrics=free_port(9090), sidecar=free_port(8099)
            )
            base = {
                k: v for k, v in os.environ.items() if not k.startswith(("CP_TOKEN_", "SIDECAR_"))
            }
            cp_env = {
                **base,
                "CP_TOKEN_LISTEN_ADDR": f"127.0.0.1:{ports.cp}",
                "CP_TOKEN_METRICS_ADDR": f"127.0.0.1:{ports.cp_metrics}",
                "CP_TOKEN_URL": f"http://127.0.0.1:{ports.cp}/token",
                "CP_TOKEN_AUTHN": "static",
                "CP_TOKEN_STATIC_IDENTITIES_FILE": ids_file,
                "CP_TOKEN_MINTER": "jwt",
                "CP_TOKEN_LOG_FORMAT": "text",
            }
            sidecar_env = {
                **base,
                "AMBIENT_CP_TOKEN_URL": f"http://127.0.0.1:{ports.cp}/token",
                "SIDECAR_LISTEN_ADDR": f"127.0.0.1:{ports.sidecar}",
                "AMBIENT_SA_TOKEN_FILE": sa_file,
                "SIDECAR_TOKEN_FILE": os.path.join(workdir, "token"),
                "SIDECAR_LOG_FORMAT": "text",
            }
            # Children run in their own session: Ctrl-C reaches the terminal's whole process
            # group, and a child that got it and then our SIGTERM took the second signal as
            # "force quit" (uvicorn then skipped the app's shutdown: a CancelledError
            # traceback at error level). Each child gets exactly one SIGTERM, from here.
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "cp_token", "serve"],
                    env=cp_env,
                    start_new_session=True,
                    stdout=sys.stderr,
                )
            )
            deadline = time.monotonic() + STARTUP_DEADLINE
            wait_ready(f"http://127.0.0.1:{ports.cp_metrics}/readyz", procs[0], deadline)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "sidecar"],
                    env=sidecar_env,
                    start_new_session=True,
                    stdout=sys.stderr,
                )
            )
            wait_ready(f"http://127.0.0.1:{ports.sidecar}/readyz", procs[1], deadline)

            # stdout carries only the curl lines, so it can be piped or pasted as is.
            print("cp-token dev: CP and sidecar are running. Try:", file=sys.stderr, flush=True)
            for line in curl_lines(ports):
                print(line, flush=True)
            print("cp-token dev: Ctrl-C stops both.", file=sys.stderr, flush=True)
            while not stop_signals:
                for proc in procs:
                    if proc.poll() is not None:
                        print(
                            f"cp-token dev: a process exited unexpectedly (code {proc.returncode})",
                            file=sys.stderr,
                        )
                        return 1
                time.sleep(0.2)
            return 0
        except RuntimeError as exc:
            print(f"cp-token dev: {exc}", file=sys.stderr)
            return 1
        finally:
            _stop(procs)
            shutil.rmtree(workdir, ignore_errors=True)
