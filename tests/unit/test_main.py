"""``python -m cp_token`` is ``cp-token``: the module runs the CLI and exits with its code."""

from __future__ import annotations

import runpy

import pytest

import cp_token.cli


def test_python_dash_m_runs_the_cli_and_exits_with_its_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cp_token.cli, "main", lambda: 3)
    with pytest.raises(SystemExit) as done:
        runpy.run_module("cp_token", run_name="__main__")
    assert done.value.code == 3
