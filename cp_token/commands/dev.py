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
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

from cp_token.runtime.processes import LOOPBACK, Proc, ProcessFailed, free_port, stop_all
from cp_token.settings.cp import Settings
from cp_token.settings.sidecar import SidecarSettings

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


def _write_files(workdir: str) -> tuple[str, str]:
    """The dev identities and the sidecar's ServiceAccount token; their paths."""
    ids_file = os.path.join(workdir, "identities.json")
    with open(ids_file, "w") as fh:
        json.dump(_identities(), fh)
    sa_file = os.path.join(workdir, "sa-token")
    with open(sa_file, "w") as fh:
        fh.write(DEV_RUNNER_TOKEN)
    return ids_file, sa_file


def cp_env(ports: DevPorts, ids_file: str) -> dict[str, str]:
    """The CP's configuration: static dev identities, the jwt minter with an ephemeral key."""
    return {
        "CP_TOKEN_LISTEN_ADDR": f"{LOOPBACK}:{ports.cp}",
        "CP_TOKEN_METRICS_ADDR": f"{LOOPBACK}:{ports.cp_metrics}",
        "CP_TOKEN_URL": f"http://{LOOPBACK}:{ports.cp}/token",
        "CP_TOKEN_AUTHN": "static",
        "CP_TOKEN_STATIC_IDENTITIES_FILE": ids_file,
        "CP_TOKEN_MINTER": "jwt",
        "CP_TOKEN_LOG_FORMAT": "text",
    }


def sidecar_env(ports: DevPorts, sa_file: str, workdir: str) -> dict[str, str]:
    """The sidecar's configuration: towards the dev CP, with the dev ServiceAccount token."""
    return {
        "AMBIENT_CP_TOKEN_URL": f"http://{LOOPBACK}:{ports.cp}/token",
        "SIDECAR_LISTEN_ADDR": f"{LOOPBACK}:{ports.sidecar}",
        "AMBIENT_SA_TOKEN_FILE": sa_file,
        "SIDECAR_TOKEN_FILE": os.path.join(workdir, "token"),
        "SIDECAR_LOG_FORMAT": "text",
    }


def _start(procs: list[Proc], args: list[str], env: dict[str, str], ready: str, end: float) -> None:
    """``python -m *args`` until ``ready`` answers 200 (the deadline is ``end``).

    Children run in their own session: Ctrl-C reaches the terminal's whole process group,
    and a child that got it and then our SIGTERM took the second signal as "force quit"
    (uvicorn then skipped the app's shutdown: a CancelledError traceback at error level).
    Each child gets exactly one SIGTERM, from here.
    """
    procs.append(Proc([sys.executable, "-m", *args], env, name=args[0], new_session=True))
    procs[-1].wait_http(ready, deadline=max(0.0, end - time.monotonic()))


def _serve_until_stopped(procs: list[Proc], stop_signals: list[int]) -> int:
    """Wait for a signal (0), or for a child to exit on its own (1)."""
    while not stop_signals:
        for proc in procs:
            if proc.popen.poll() is not None:
                print(
                    f"cp-token dev: a process exited unexpectedly (code {proc.popen.returncode})",
                    file=sys.stderr,
                )
                return 1
        time.sleep(0.2)
    return 0


def run_dev() -> int:
    """Start CP + sidecar, print the curl lines, wait for Ctrl-C; returns the exit code."""
    workdir = tempfile.mkdtemp(prefix="cp-token-dev-")
    procs: list[Proc] = []
    with _signals_stop() as stop_signals:
        try:
            ids_file, sa_file = _write_files(workdir)
            ports = DevPorts(  # the usual ports when they are free
                cp=free_port(Settings.listen_port),
                cp_metrics=free_port(Settings.metrics_port),
                sidecar=free_port(SidecarSettings.listen_port),
            )
            end = time.monotonic() + STARTUP_DEADLINE
            ready = f"http://{LOOPBACK}:{ports.cp_metrics}/readyz"
            _start(procs, ["cp_token", "serve"], cp_env(ports, ids_file), ready, end)
            ready = f"http://{LOOPBACK}:{ports.sidecar}/readyz"
            _start(procs, ["sidecar"], sidecar_env(ports, sa_file, workdir), ready, end)
            # stdout carries only the curl lines, so it can be piped or pasted as is.
            print("cp-token dev: CP and sidecar are running. Try:", file=sys.stderr, flush=True)
            for line in curl_lines(ports):
                print(line, flush=True)
            print("cp-token dev: Ctrl-C stops both.", file=sys.stderr, flush=True)
            return _serve_until_stopped(procs, stop_signals)
        except ProcessFailed as exc:
            print(f"cp-token dev: {exc}", file=sys.stderr)
            return 1
        finally:
            stop_all(procs)
            shutil.rmtree(workdir, ignore_errors=True)
