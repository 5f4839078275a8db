"""The red team's malformed CP answers (issue 17) against the real processes: a running
``cp-token-sidecar`` that holds a valid token keeps serving it and does not exit;
``cp-token-sidecar --once`` and ``cp-token get`` exit 1 with one line, no traceback and no
token text. The malicious upstream is a raw TCP server on 127.0.0.1
(``tests/fakes/hostile_upstream.py``); the answers are in its ``HOSTILE_ANSWERS``."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.hostile_upstream import GOOD_TOKEN, HOSTILE_ANSWERS, SECRET, RawUpstream
from tests.integration.procs import ROOT, clean_env, sidecar_serve

CASES = sorted(HOSTILE_ANSWERS)
HEADER = {"Ambient-Token-Request": "true"}
MAX_LINE = 1000  # the URL, our words and at most 300 characters of upstream text


def refusal(case: str) -> bool:
    """A 403: a refusal (relayed, not retried), not an unavailable answer."""
    return HOSTILE_ANSWERS[case].startswith(b"HTTP/1.1 403")


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    with RawUpstream() as server:
        yield server


@pytest.fixture
def sa_file(tmp_path: Path) -> Path:
    path = tmp_path / "sa"
    path.write_text("sa.jwt.token")
    return path


def poll(predicate: object, deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {deadline}s: {what}")


@pytest.mark.parametrize("case", CASES)
def test_the_running_sidecar_keeps_serving_its_token(
    case: str, upstream: RawUpstream, sa_file: Path, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    path = f"good-then/{case}"
    proc, base = sidecar_serve(
        upstream.url(path), sa_file, tmp_path / "sidecar.log", SIDECAR_TOKEN_FILE=str(token_file)
    )
    try:
        proc.wait_http(f"{base}/readyz")
        with httpx.Client(base_url=base, trust_env=False, timeout=10) as http:
            assert http.get("/token", headers=HEADER).json()["token"] == GOOD_TOKEN
            # asks for more than the held token has left: the sidecar fetches, gets the bad
            # answer, and still serves what it holds
            again = http.get("/token", params={"min_ttl": 3600}, headers=HEADER)
            assert again.status_code == 200 and again.json()["token"] == GOOD_TOKEN
            assert upstream.count(path) == 2
            time.sleep(0.3)  # a dying loop would take the process down about now
            assert proc.popen.poll() is None, proc.output()[-3000:]
            assert http.get("/token", headers=HEADER).json()["token"] == GOOD_TOKEN
            assert http.get("/readyz").status_code == 200
            metrics = http.get("/metrics").text
        assert token_file.read_text() == GOOD_TOKEN  # never the bad answer's token
        outcome = "rejected" if refusal(case) else None
        failed = [
            line
            for line in metrics.splitlines()
            if line.startswith("cp_token_sidecar_upstream_fetches_total")
            and 'outcome="ok"' not in line
            and not line.endswith(" 0.0")
        ]
        assert failed, metrics  # the bad answer was counted as a failed fetch
        if outcome:
            assert any(outcome in line for line in failed)
    finally:
        proc.stop()
    log = proc.output()
    assert "Traceback" not in log
    assert SECRET not in log  # neither the good token nor the bad one


def run_all(commands: dict[str, tuple[list[str], dict[str, str]]]) -> dict[str, tuple[int, str]]:
    """Run every command at once (each may retry to its deadline); (exit code, stderr)."""
    procs = {
        name: subprocess.Popen(
            args,
            env=clean_env(env),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, env) in commands.items()
    }
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=90)
            results[name] = (proc.returncode, err + out)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return results


def check_one_line(results: dict[str, tuple[int, str]], prog: str) -> None:
    problems = []
    for case, (code, output) in sorted(results.items()):
        lines = output.splitlines()
        if code != 1:
            problems.append(f"{case}: exit {code}")
        elif len(lines) != 1 or not lines[0].startswith(f"{prog}: "):
            problems.append(f"{case}: not one line: {output[:500]!r}")
        elif "Traceback" in output or SECRET in output:
            problems.append(f"{case}: traceback or token text: {output[:500]!r}")
        elif len(lines[0]) > MAX_LINE:
            problems.append(f"{case}: a line of {len(lines[0])} characters")
    assert not problems, "\n".join(problems)


def test_cp_token_sidecar_once_says_one_line_for_every_bad_answer(
    upstream: RawUpstream, sa_file: Path, tmp_path: Path
) -> None:
    commands = {
        case: (
            [sys.executable, "-m", "sidecar", "--once", "--deadline", "1"],
            {
                "AMBIENT_CP_TOKEN_URL": upstream.url(case),
                "AMBIENT_SA_TOKEN_FILE": str(sa_file),
                "SIDECAR_TOKEN_FILE": str(tmp_path / f"token-{case}"),
            },
        )
        for case in CASES
    }
    check_one_line(run_all(commands), "cp-token-sidecar")
    assert not list(tmp_path.glob("token-*"))  # no bad token written


def test_cp_token_get_says_one_line_for_every_bad_answer(
    upstream: RawUpstream, sa_file: Path
) -> None:
    """Each retries to the client's 30 s deadline (a bad answer is the unavailable path),
    so they run at once."""
    commands = {
        case: (
            [sys.executable, "-m", "cp_token", "get"],
            {"AMBIENT_CP_TOKEN_URL": upstream.url(case), "AMBIENT_SA_TOKEN_FILE": str(sa_file)},
        )
        for case in CASES
    }
    results = run_all(commands)
    check_one_line(results, "cp-token get")
    assert all(upstream.count(case) >= 2 for case in CASES if not refusal(case))
