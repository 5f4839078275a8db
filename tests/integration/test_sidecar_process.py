"""`cp-token-sidecar` as a real process against a fake CP on loopback.

Time here is real, so the fake CP issues short-lived tokens (a few seconds) and every wait is
a poll with a deadline.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.fake_cp import FakeCP
from tests.integration.procs import Proc, free_port, run_cmd

SIDECAR = [sys.executable, "-m", "sidecar"]
HEADER = {"Ambient-Token-Request": "true"}


def poll(predicate: Callable[[], bool], deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {deadline}s: {what}")


@pytest.fixture
def sa_file(tmp_path: Path) -> Path:
    path = tmp_path / "sa-token"
    path.write_text("sa-token")
    return path


def sidecar_env(cp: FakeCP, sa_file: Path, port: int, **extra: str) -> dict[str, str]:
    return {
        "AMBIENT_CP_TOKEN_URL": cp.url,
        "AMBIENT_SA_TOKEN_FILE": str(sa_file),
        "SIDECAR_LISTEN_ADDR": f"127.0.0.1:{port}",
        "SIDECAR_MIN_TTL": "1",
        **extra,
    }


class Sidecar:
    def __init__(self, proc: Proc, port: int) -> None:
        self.proc = proc
        self.base = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.base, trust_env=False, timeout=5)

    def token(self, method: str = "GET") -> httpx.Response:
        return self.http.request(method, "/token", headers=HEADER)


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator[Callable[..., Sidecar]]:
    started: list[Sidecar] = []

    def start(env: dict[str, str], port: int) -> Sidecar:
        proc = Proc(SIDECAR, env, tmp_path / f"sidecar-{len(started)}.log")
        sidecar = Sidecar(proc, port)
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        sidecar.http.close()
        sidecar.proc.kill()


class FileWatcher:
    """Reads the token file every 20 ms and records any token found past its expiry."""

    def __init__(self, path: Path, cp: FakeCP) -> None:
        self.path, self.cp = path, cp
        self.violations: list[str] = []
        self.reads = 0
        self.absent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                token = self.path.read_text()
            except FileNotFoundError:
                self.absent += 1
                continue
            self.reads += 1
            if self.cp.expiry(token) <= time.time():
                self.violations.append(f"expired token in the file at {time.time()}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_serves_through_a_cp_outage_and_exits_0_on_sigterm(
    tmp_path: Path, sa_file: Path, start_sidecar: Callable[..., Sidecar]
) -> None:
    token_file = tmp_path / "shared" / "token"
    token_file.parent.mkdir()
    with FakeCP(ttl=8, sa_token="sa-token") as cp:
        port = free_port()
        env = sidecar_env(cp, sa_file, port, SIDECAR_TOKEN_FILE=str(token_file))
        sidecar = start_sidecar(env, port)
        sidecar.proc.wait_http(f"{sidecar.base}/readyz")
        first = sidecar.token().json()
        assert first["token"] in cp.issued
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        watcher = FileWatcher(token_file, cp)
        try:
            cp.server.stop()  # outage: connections refused
            outage_end = time.monotonic() + 5
            while time.monotonic() < outage_end:
                response = sidecar.token()
                assert response.status_code == 200
                body = response.json()
                assert body["token"] == first["token"]
                assert 0 < body["expires_in"] <= 8
                assert sidecar.http.get("/readyz").status_code == 200
                time.sleep(0.25)
            cp.server.start()
            poll(
                lambda: sidecar.token().json()["token"] != first["token"],
                deadline=8,
                what="a new token after the CP came back",
            )
            renewed = sidecar.token().json()["token"]
            poll(lambda: token_file.read_text() == renewed, 2, "the file holds the new token")
        finally:
            watcher.stop()
        assert watcher.violations == []
        assert watcher.reads > 50 and watcher.absent == 0  # always present, never expired
        started = time.monotonic()
        assert sidecar.proc.terminate(timeout=10) == 0
        assert time.monotonic() - started < 5
    log = sidecar.proc.output()
    assert "Traceback" not in log
    for token in cp.issued:
        assert token not in log
    assert "sa-token" not in log.replace("sa-token-file", "").replace(str(sa_file), "")


def test_a_long_outage_removes_the_file_and_turns_unready_then_recovers(
    tmp_path: Path, sa_file: Path, start_sidecar: Callable[..., Sidecar]
) -> None:
    token_file = tmp_path / "token"
    with FakeCP(ttl=3, sa_token="sa-token") as cp:
        port = free_port()
        env = sidecar_env(cp, sa_file, port, SIDECAR_TOKEN_FILE=str(token_file))
        sidecar = start_sidecar(env, port)
        sidecar.proc.wait_http(f"{sidecar.base}/readyz")
        cp.server.stop()
        poll(lambda: not token_file.exists(), 8, "the expired token file removed")
        assert sidecar.http.get("/readyz").status_code == 503
        response = sidecar.token()
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"] == "temporarily_unavailable"
        cp.server.start()
        # a consumer forcing a fresh token (POST) brings it back without waiting the backoff
        poll(lambda: sidecar.token("POST").status_code == 200, 10, "a token after recovery")
        assert sidecar.http.get("/readyz").status_code == 200
        poll(lambda: token_file.exists(), 2, "the token file written again")
        assert sidecar.proc.terminate() == 0


def test_relays_a_cp_refusal_and_logs_it_once(
    tmp_path: Path, sa_file: Path, start_sidecar: Callable[..., Sidecar]
) -> None:
    with FakeCP(sa_token="sa-token") as cp:
        cp.mode = "forbidden"
        port = free_port()
        sidecar = start_sidecar(sidecar_env(cp, sa_file, port), port)
        sidecar.proc.wait_http(f"{sidecar.base}/healthz")
        poll(lambda: sidecar.token().status_code == 403, 5, "the refusal relayed")
        assert sidecar.token().json()["error_description"] == cp.description
        assert sidecar.proc.terminate() == 0
    assert sidecar.proc.output().count(cp.description) == 1


def test_metrics_address_serves_probes_but_never_tokens(
    sa_file: Path, start_sidecar: Callable[..., Sidecar]
) -> None:
    with FakeCP(sa_token="sa-token") as cp:
        port, mport = free_port(), free_port()
        env = sidecar_env(cp, sa_file, port, SIDECAR_METRICS_ADDR=f"127.0.0.1:{mport}")
        sidecar = start_sidecar(env, port)
        sidecar.proc.wait_http(f"http://127.0.0.1:{mport}/readyz")
        with httpx.Client(base_url=f"http://127.0.0.1:{mport}", trust_env=False) as metrics:
            assert metrics.get("/token", headers=HEADER).status_code == 404
            text = metrics.get("/metrics").text
        assert "\ncp_token_sidecar_ready 1.0" in text
        assert sidecar.token().status_code == 200
        assert sidecar.proc.terminate() == 0


# --- --once (init container) ------------------------------------------------------------------


def test_once_writes_the_file_and_exits_0(tmp_path: Path, sa_file: Path) -> None:
    token_file = tmp_path / "token"
    with FakeCP(sa_token="sa-token") as cp:
        env = sidecar_env(
            cp, sa_file, 0, SIDECAR_TOKEN_FILE=str(token_file), SIDECAR_TOKEN_FILE_MODE="0640"
        )
        result = run_cmd([*SIDECAR, "--once"], env)
    assert result.returncode == 0, result.stderr
    token = token_file.read_text()
    assert token in cp.issued
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o640
    assert token not in result.stdout + result.stderr


def test_once_fails_with_one_line_when_refused(tmp_path: Path, sa_file: Path) -> None:
    with FakeCP(sa_token="sa-token") as cp:
        cp.mode = "forbidden"
        env = sidecar_env(cp, sa_file, 0, SIDECAR_TOKEN_FILE=str(tmp_path / "token"))
        result = run_cmd([*SIDECAR, "--once"], env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert cp.description in lines[0]
    assert not (tmp_path / "token").exists()


def test_once_gives_up_after_its_deadline_when_the_cp_is_down(
    tmp_path: Path, sa_file: Path
) -> None:
    env = {
        "AMBIENT_CP_TOKEN_URL": f"http://127.0.0.1:{free_port()}/token",
        "AMBIENT_SA_TOKEN_FILE": str(sa_file),
        "SIDECAR_TOKEN_FILE": str(tmp_path / "token"),
    }
    started = time.monotonic()
    result = run_cmd([*SIDECAR, "--once", "--deadline", "1.5"], env)
    assert result.returncode == 1
    assert time.monotonic() - started < 10
    assert "cannot get a token" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- configuration errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "args", "variable"),
    [
        ({}, [], "AMBIENT_CP_TOKEN_URL"),
        ({"AMBIENT_CP_TOKEN_URL": "http://u:p@cp.example/token"}, [], "AMBIENT_CP_TOKEN_URL"),
        ({"AMBIENT_CP_TOKEN_URL": "cp.example/token"}, [], "AMBIENT_CP_TOKEN_URL"),
        (
            {"AMBIENT_CP_TOKEN_URL": "https://cp/token", "SIDECAR_LISTEN_ADDR": "0.0.0.0:8099"},
            [],
            "SIDECAR_LISTEN_ADDR",
        ),
        (
            {"AMBIENT_CP_TOKEN_URL": "https://cp/token", "SIDECAR_TOKEN_FILE_MODE": "rw"},
            [],
            "SIDECAR_TOKEN_FILE_MODE",
        ),
        ({"AMBIENT_CP_TOKEN_URL": "https://cp/token"}, ["--once"], "SIDECAR_TOKEN_FILE"),
    ],
    ids=["missing-url", "user-info", "no-scheme", "non-loopback", "bad-mode", "once-no-file"],
)
def test_configuration_errors_exit_2_with_one_line(
    env: dict[str, str], args: list[str], variable: str
) -> None:
    result = run_cmd([*SIDECAR, *args], env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("cp-token-sidecar")
    assert os.access(script, os.X_OK)
    result = run_cmd([str(script), "--help"], {})
    assert result.returncode == 0
    assert "--once" in result.stdout
