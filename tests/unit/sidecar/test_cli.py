"""``cp-token-sidecar``'s argument handling and ``--once``, in this process: a configuration
mistake is exit 2 with one line naming the variable (``--once`` needs a token file and is
refused for a sealed sidecar), ``--once`` writes the token with the file's mode and exits 0,
and a failure is exit 1 with one line that never quotes the answer. (As a child process, and
``serve`` on real sockets: tests/integration/test_sidecar_process.py, test_sidecar_serve.py.)"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cp_token.client import FetchedToken, TokenRejected
from cp_token.settings.sidecar import SidecarSettings
from sidecar.cli import main, run_once

CP_URL = "http://127.0.0.1:9/token"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("SIDECAR_", "AMBIENT_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AMBIENT_CP_TOKEN_URL", CP_URL)


@pytest.mark.parametrize(
    ("env", "args", "variable"),
    [
        ({"AMBIENT_CP_TOKEN_URL": ""}, [], "AMBIENT_CP_TOKEN_URL"),
        ({"SIDECAR_LISTEN_ADDR": "nowhere"}, [], "SIDECAR_LISTEN_ADDR"),
        ({}, ["--once"], "SIDECAR_TOKEN_FILE"),
        (
            {"SIDECAR_SEALED": "true", "SIDECAR_UPSTREAMS": "api=https://api.example/"},
            ["--once"],
            "SIDECAR_SEALED",
        ),
    ],
)
def test_a_configuration_mistake_is_exit_2_and_one_line(
    env: dict[str, str],
    args: list[str],
    variable: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"cp-token-sidecar: {variable}: "), err


@pytest.mark.parametrize("args", [["--deadline", "soon"], ["--frobnicate"]])
def test_a_bad_argument_is_a_usage_error(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2
    assert "usage: cp-token-sidecar" in capsys.readouterr().err


class OneAnswer:
    """What ``run_once`` needs of the upstream source: one fetch, then close."""

    def __init__(self, answer: FetchedToken | BaseException) -> None:
        self.answer = answer
        self.closed = False

    async def afetch(self) -> FetchedToken:
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    async def aclose(self) -> None:
        self.closed = True


def once_settings(token_file: Path) -> SidecarSettings:
    return SidecarSettings(cp_token_url=CP_URL, token_file=str(token_file), token_file_mode=0o640)


async def test_once_writes_the_token_with_its_mode(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    source = OneAnswer(FetchedToken("api-token", 900, None, 0.0))
    assert await run_once(once_settings(token_file), source) == 0  # type: ignore[arg-type]
    assert token_file.read_text() == "api-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o640
    assert source.closed


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (TokenRejected(403, "not a session runner", CP_URL), "not a session runner"),
        (KeyError("secret-token-text"), "unexpected KeyError"),
    ],
)
async def test_once_without_a_token_is_exit_1_and_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], error: BaseException, says: str
) -> None:
    source = OneAnswer(error)
    assert await run_once(once_settings(tmp_path / "token"), source) == 1  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cp-token-sidecar: cannot get a token: ")
    assert says in err and "secret-token-text" not in err
    assert source.closed and not (tmp_path / "token").exists()


async def test_once_with_an_unwritable_file_is_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "missing-dir" / "token"
    source = OneAnswer(FetchedToken("api-token", 900, None, 0.0))
    assert await run_once(once_settings(token_file), source) == 1  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err.startswith(f"cp-token-sidecar: cannot write {str(token_file)!r}")
    assert "api-token" not in err
