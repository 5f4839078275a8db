"""`cp-token get`: token on stdout, one line on stderr, exit codes 0/1/2."""

from __future__ import annotations

from pathlib import Path

import pytest

from cp_token.commands.get import run_get

VARIABLES = (
    "AMBIENT_TOKEN_SIDECAR_URL",
    "AMBIENT_CP_TOKEN_URL",
    "BOT_TOKEN",
    "AMBIENT_CP_CA_FILE",
    "AMBIENT_API_URL",
    "AMBIENT_GRPC_ADDR",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_prints_the_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BOT_TOKEN", "dev-token")
    assert run_get([]) == 0
    out, _ = capsys.readouterr()
    assert out == "dev-token\n"


def test_no_source_is_a_failure_naming_the_variables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_get([]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "AMBIENT_TOKEN_SIDECAR_URL" in err


def test_a_malformed_url_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AMBIENT_CP_TOKEN_URL", "http://user:pw@cp.example/token")
    assert run_get([]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1
    assert "AMBIENT_CP_TOKEN_URL" in err


def test_a_failure_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AMBIENT_CP_TOKEN_URL", "http://127.0.0.1:9/token")
    monkeypatch.setenv("AMBIENT_SA_TOKEN_FILE", str(tmp_path / "missing"))
    assert run_get([]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "projected" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_get(["--min-ttl", "soon"]) == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AMBIENT_API_URL", "http://127.0.0.1:8099/upstream/api"),
        ("AMBIENT_GRPC_ADDR", "127.0.0.1:8098"),
    ],
)
def test_a_sealed_pod_has_no_token_to_print(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    monkeypatch.setenv("BOT_TOKEN", "dev-token")  # sealed wins: nothing falls through
    assert run_get([]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "sealed" in err and "api_client()" in err and "dev-token" not in err
