"""The one error a bad configuration raises, wherever it is found (settings, watched files)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """A configuration mistake: names the variable and the problem in one line.

    The commands turn it into exit code 2 and that one line, never a traceback.
    """

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem
