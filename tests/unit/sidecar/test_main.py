"""``cp-token-sidecar`` (``sidecar.__main__:main``, the console script and ``python -m
sidecar``): it runs ``sidecar.cli.main`` when the server extra is installed, and otherwise says
which extra to install (exit 2) without importing the server side. (The refusal, in a
subprocess where the extra looks uninstalled: tests/unit/project/test_packaging.py.)"""

from __future__ import annotations

import pytest

import sidecar.cli
from cp_token import extras
from sidecar.__main__ import main


def test_the_console_script_runs_the_sidecar_s_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    def cli_main(*args: object) -> int:
        calls.append(args)
        return 7

    monkeypatch.setattr(sidecar.cli, "main", cli_main)
    assert main() == 7
    assert calls == [()]  # argv is the CLI's own to read


def test_without_the_server_extra_it_names_it_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(extras, "missing_server_modules", lambda: ["uvicorn"])
    monkeypatch.setattr(sidecar.cli, "main", lambda: pytest.fail("the CLI must not run"))
    assert main() == 2
    err = capsys.readouterr().err
    assert err.startswith("cp-token-sidecar: needs the 'server' extra (module 'uvicorn'")
    assert "pip install 'cp-token[server]'" in err
