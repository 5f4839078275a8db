"""The front door and the reference are taken from the code: the README stays short and
leads with the two commands; docs/reference.md lists every variable of every settings
dataclass."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
REFERENCE = ROOT / "docs" / "reference.md"


def variables_read_by_config() -> set[str]:
    # cp_token/settings/ is the only reader of the environment, one module per component
    source = "".join(p.read_text() for p in sorted((ROOT / "cp_token" / "settings").glob("*.py")))
    names = set(re.findall(r'"((?:CP_TOKEN|OIDC|SIDECAR|AMBIENT|BOT)_[A-Z_]*|KUBECONFIG)"', source))
    return {n for n in names if not n.endswith("_")}


def test_every_variable_is_documented_in_the_reference() -> None:
    reference = REFERENCE.read_text()
    names = variables_read_by_config()
    assert len(names) > 40  # the scan found the settings
    assert {"AMBIENT_CP_ALLOW_PLAINTEXT", "CP_TOKEN_INJECT_CA_CONFIGMAP"} <= names
    missing = sorted(n for n in names if f"`{n}`" not in reference)
    assert not missing, f"docs/reference.md lacks: {missing}"


def test_quick_start_is_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    assert "make run" in quick and "make test" in quick
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_is_a_front_door() -> None:
    """At most ~150 lines: what it is, the two commands, where to go next."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for target in ("docs/operating.md", "docs/reference.md", "docs/design.md"):
        assert f"]({target}" in readme, target
