"""Which commands need the ``server`` extra: finding what is missing without importing it,
and running a server command's target (the refusal itself: tests/unit/project/test_packaging.py,
in a subprocess where the extra looks uninstalled)."""

from __future__ import annotations

import sys

import pytest

from cp_token.extras import missing_server_modules, run_server_command


def test_missing_modules_are_found_without_importing_them() -> None:
    assert missing_server_modules(["json", "no_such_module_xyz"]) == ["no_such_module_xyz"]
    assert "no_such_module_xyz" not in sys.modules
    assert missing_server_modules() == []  # the dev environment has the extra


def test_run_server_command_calls_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_server_command("prog", "json:dumps", 5) == "5"
    assert capsys.readouterr().err == ""
