"""Child processes on loopback: free ports, a clean environment, start, wait until ready, and
stop by pid.

One set of helpers for everything that starts the product's commands as processes:
``cp-token dev``, the integration tests (``tests/integration/procs.py``) and the benches
(``bench/common.py``). Standard library at import; httpx (the client's one dependency) when
polling, so a bench's load generator that imports this module does not pay for it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "LOOPBACK",
    "PRODUCT_PREFIXES",
    "Proc",
    "ProcessFailed",
    "clean_env",
    "free_port",
    "stop_all",
]

LOOPBACK = "127.0.0.1"
# Variables the product reads: a child gets only those its starter passes.
PRODUCT_PREFIXES = ("CP_TOKEN_", "SIDECAR_", "AMBIENT_", "OIDC_", "KUBECONFIG", "BOT_TOKEN")
# How much of a failed process's output an error carries.
OUTPUT_TAIL = 8000


def free_port(preferred: int = 0) -> int:
    """``preferred`` if it is free on 127.0.0.1, else any free port (bind and release)."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError(f"no free port on {LOOPBACK}")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any product variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PRODUCT_PREFIXES)}
    env.update(extra or {})
    return env


class ProcessFailed(RuntimeError):
    """A child process exited too early, or did not answer in time."""


class Proc:
    """A command started with a clean environment (:func:`clean_env` + ``env``).

    Its output (stdout and stderr) goes to the file ``log``, or, without one, to this
    process's stderr. ``new_session`` puts it in its own session, so a terminal's Ctrl-C
    reaches only its starter, which stops it (one signal, not two).
    """

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        log: Path | None = None,
        *,
        name: str | None = None,
        cwd: Path | str | None = None,
        new_session: bool = False,
    ) -> None:
        self.name = name or " ".join(args[1:3]) or args[0]
        self.log_path = log
        self._log: IO[bytes] | None = None if log is None else open(log, "wb")
        self.popen = subprocess.Popen(
            list(args),
            env=clean_env(env),
            stdout=sys.stderr if self._log is None else self._log,
            stderr=None if self._log is None else subprocess.STDOUT,
            cwd=cwd,
            start_new_session=new_session,
        )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def output(self) -> str:
        """What the process wrote to its log so far ("" without a log file)."""
        if self.log_path is None:
            return ""
        if self._log is not None and not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _failed(self, what: str) -> ProcessFailed:
        tail = self.output()[-OUTPUT_TAIL:]
        return ProcessFailed(f"{self.name}: {what}" + (f":\n{tail}" if tail else ""))

    def wait_http(
        self,
        url: str,
        deadline: float = 30.0,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        **client_options: Any,
    ) -> None:
        """Poll ``url`` until it answers ``status``; ProcessFailed when the process exits
        first or ``deadline`` seconds pass. ``client_options`` go to ``httpx.Client``."""
        import httpx

        end = time.monotonic() + deadline
        last = "no answer"
        with httpx.Client(trust_env=False, timeout=1.0, **client_options) as client:
            while time.monotonic() < end:
                if self.popen.poll() is not None:
                    raise self._failed(f"exited {self.popen.returncode}")
                try:
                    resp = client.get(url, headers=dict(headers or {}))
                    if resp.status_code == status:
                        return
                    last = f"{resp.status_code} {resp.text[:200]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.05)
        raise self._failed(f"{url} not {status} in {deadline:g} s ({last})")

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit code; a process still running after ``timeout`` is killed
        and ``subprocess.TimeoutExpired`` raised."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        finally:
            self.kill()

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, up to ``grace`` seconds to exit, then SIGKILL; the exit code."""
        stop_all([self], grace)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL now if it still runs, and close the log."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        if self._log is not None:
            self._log.close()


def stop_all(procs: Iterable[Proc], grace: float = 10.0) -> None:
    """SIGTERM to each (at once), up to ``grace`` seconds for all to exit, then SIGKILL."""
    procs = list(procs)
    for proc in procs:
        if proc.popen.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
    end = time.monotonic() + grace
    for proc in procs:
        try:
            proc.popen.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        proc.kill()
