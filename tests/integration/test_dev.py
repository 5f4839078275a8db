"""``cp-token dev``: the printed curl lines work as printed; Ctrl-C stops everything, exit 0."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.procs import ROOT, clean_env


def read_curl_lines(proc: subprocess.Popen[str], deadline: float) -> list[str]:
    """stdout carries nothing but the curl lines, one per line."""
    lines: list[str] = []
    assert proc.stdout is not None
    while time.monotonic() < deadline and len(lines) < 4:
        line = proc.stdout.readline()
        if not line:
            break
        assert line.startswith("curl "), line
        lines.append(line.strip())
    return lines


def run_curl(line: str) -> subprocess.CompletedProcess[str]:
    # exactly as a user pastes it into a shell
    return subprocess.run(
        ["sh", "-c", line], capture_output=True, text=True, timeout=20, env=clean_env({})
    )


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_dev_prints_working_curl_lines_and_stops_cleanly(stop_signal: int, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "cp-token"), "dev"],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "err.log", "w"),
        text=True,
        env=clean_env({}),
        cwd=ROOT,
    )
    try:
        lines = read_curl_lines(proc, time.monotonic() + 40)
        assert len(lines) == 4 and all(line.startswith("curl ") for line in lines)
        ports = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", " ".join(lines))}
        sidecar, direct, refused, jwks = (run_curl(line) for line in lines)
        for result in (sidecar, direct):
            body = json.loads(result.stdout)
            assert body["token_type"] == "Bearer" and body["expires_in"] > 800
            assert body["token"].count(".") == 2
        assert " 403 " in refused.stdout.splitlines()[0]
        assert "access_denied" in refused.stdout
        assert json.loads(jwks.stdout)["keys"][0]["alg"] == "ES256"
        assert all(port_open(p) for p in ports)
        os.kill(proc.pid, stop_signal)
        assert proc.wait(timeout=30) == 0
        assert not any(port_open(p) for p in ports), "a child process is still listening"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


ERROR_LINE = re.compile(r"^\S+ (error|critical)\s", re.MULTILINE)


def test_ctrl_c_on_the_terminal_group_is_clean(tmp_path: Path) -> None:
    """A terminal's Ctrl-C signals the whole foreground process group, not just `cp-token dev`.

    The children used to get that SIGINT and then the parent's SIGTERM; the CP took the
    second signal as "force quit", uvicorn skipped the app's shutdown, and the cancelled
    lifespan logged a CancelledError traceback at error level.
    """
    err_path = tmp_path / "err.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "cp-token"), "dev"],
        stdout=subprocess.PIPE,
        stderr=open(err_path, "w"),
        text=True,
        env=clean_env({}),
        cwd=ROOT,
        start_new_session=True,  # its own group, standing for the terminal's foreground group
    )
    try:
        lines = read_curl_lines(proc, time.monotonic() + 40)
        assert len(lines) == 4
        ports = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", " ".join(lines))}
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not any(port_open(p) for p in ports), "a child process is still listening"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = err_path.read_text()
    assert "Traceback" not in err and "CancelledError" not in err, err
    assert not ERROR_LINE.findall(err), err
    assert "Application shutdown complete" in err  # the CP's app was stopped in order
