"""A configuration mistake is one line naming the variable."""

from __future__ import annotations

from cp_token.runtime.errors import ConfigError


def test_a_config_error_names_its_variable_in_one_line() -> None:
    err = ConfigError("CP_TOKEN_TTL", "must be a whole number of seconds")
    assert str(err) == "CP_TOKEN_TTL: must be a whole number of seconds"
    assert (err.variable, err.problem) == ("CP_TOKEN_TTL", "must be a whole number of seconds")
