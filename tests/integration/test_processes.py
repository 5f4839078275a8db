"""`cp_token.runtime.processes`, the helpers `cp-token dev`, the tests and the benches share: real
child processes on loopback, always stopped by pid."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cp_token.runtime.processes import Proc, ProcessFailed, free_port, stop_all

SERVE = "import http.server as s; s.test(s.SimpleHTTPRequestHandler, port={port}, bind='127.0.0.1')"
# Ignores SIGTERM, says so once it is set up, then waits to be killed.
STUBBORN = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)


def wait_for(proc: Proc, text: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while text not in proc.output():
        assert time.monotonic() < end, proc.output()
        assert proc.popen.poll() is None, proc.output()
        time.sleep(0.02)


def test_ready_then_terminated(tmp_path: Path) -> None:
    port = free_port()
    proc = Proc([sys.executable, "-c", SERVE.format(port=port)], {}, tmp_path / "out.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/", deadline=20)
        assert proc.terminate(timeout=10) == -signal.SIGTERM
    finally:
        proc.kill()


def test_an_early_exit_fails_the_wait_with_the_output(tmp_path: Path) -> None:
    code = "import sys; print('bad config'); sys.exit(2)"
    proc = Proc([sys.executable, "-c", code], {}, tmp_path / "out.log", name="broken")
    with pytest.raises(ProcessFailed) as info:
        proc.wait_http(f"http://127.0.0.1:{free_port()}/", deadline=20)
    assert str(info.value).startswith("broken: exited 2")
    assert "bad config" in str(info.value)
    proc.kill()


def test_stop_kills_what_ignores_sigterm_after_the_grace(tmp_path: Path) -> None:
    procs = [Proc([sys.executable, "-c", STUBBORN], {}, tmp_path / f"{i}.log") for i in (1, 2)]
    for proc in procs:
        wait_for(proc, "ready")
    started = time.monotonic()
    stop_all(procs, grace=0.5)
    assert time.monotonic() - started < 5  # one grace for all, not one each
    assert [p.popen.returncode for p in procs] == [-signal.SIGKILL, -signal.SIGKILL]


def test_terminate_raises_when_the_process_stays(tmp_path: Path) -> None:
    proc = Proc([sys.executable, "-c", STUBBORN], {}, tmp_path / "out.log")
    wait_for(proc, "ready")
    with pytest.raises(subprocess.TimeoutExpired):
        proc.terminate(timeout=0.3)
    assert proc.popen.returncode == -signal.SIGKILL  # killed on the way out
