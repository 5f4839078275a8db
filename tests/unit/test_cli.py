"""``cp-token``: the version, dispatch, and a configuration mistake as exit 2 with one line."""

from __future__ import annotations

import pytest

import cp_token
from cp_token.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"cp-token {cp_token.__version__}"


def test_an_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["frobnicate"])
    assert done.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        ("serve", "CP_TOKEN_MINTER", "bogus"),
        ("serve", "CP_TOKEN_LISTEN_ADDR", "nowhere"),
        ("inject", "CP_TOKEN_INJECT_TLS_CERT_FILE", ""),
    ],
)
def test_a_configuration_mistake_is_exit_2_and_one_line(
    command: str,
    variable: str,
    value: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, value)
    assert main([command]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cp-token: {variable}: "), err
    assert "Traceback" not in err


def test_a_serve_flag_overrides_its_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CP_TOKEN_MINTER", "jwt")
    assert main(["serve", "--minter", "bogus"]) == 2
    assert capsys.readouterr().err.startswith("cp-token: CP_TOKEN_MINTER: ")
