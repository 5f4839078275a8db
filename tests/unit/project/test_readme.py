"""The README's configuration tables are taken from the code: every variable read is listed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def variables_read_by_config() -> set[str]:
    # cp_token/settings/ is the only reader of the environment, one module per component
    source = "".join(p.read_text() for p in sorted((ROOT / "cp_token" / "settings").glob("*.py")))
    names = set(re.findall(r'"((?:CP_TOKEN|OIDC|SIDECAR|AMBIENT|BOT)_[A-Z_]*|KUBECONFIG)"', source))
    return {n for n in names if not n.endswith("_")}


def test_every_variable_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    names = variables_read_by_config()
    assert len(names) > 40  # the scan found the settings
    missing = sorted(n for n in names if f"`{n}`" not in readme)
    assert not missing, f"README lacks: {missing}"


def test_quick_start_is_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    assert "make run" in quick and "make test" in quick
    assert "make test" in (ROOT / ".ci" / "run").read_text()
