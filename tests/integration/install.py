"""Install this project into a fresh venv the way a user would, and read what got installed.

Shared by tests/integration/test_client_install.py and the benchmark table (make bench).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

from tests.integration.procs import ROOT, clean_env

__all__ = ["canonical", "closure", "install_into_fresh_venv"]

LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name']: d.requires or [] for d in m.distributions()}))"
)


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, requires: dict[str, list[str]]) -> set[str]:
    """``root`` and every distribution it requires, transitively, on this interpreter
    (requirements behind an extra or a marker that does not hold are left out)."""
    environment: dict[str, str] = {**default_environment(), "extra": ""}
    seen: set[str] = set()
    todo = [canonical(root)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for raw in requires.get(name, []):
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate(environment):
                todo.append(canonical(req.name))
    return seen


def install_into_fresh_venv(workdir: Path, spec: str = "") -> tuple[Path, dict[str, list[str]]]:
    """``pip install <copy of the sources><spec>`` into a new venv without pip itself;
    returns (the venv's bin directory, {distribution: its requirements}) of what is installed.

    The sources are copied first: pip builds in place and would write build/ and *.egg-info
    into the work tree while other tests run.
    """
    src = workdir / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("cp_token", "sidecar"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = workdir / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = clean_env({"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    target = f"{src}{spec}"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", target],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip install {target} failed:\n{done.stderr[-3000:]}")
    listing = subprocess.run(
        [str(python), "-c", LIST_DISTRIBUTIONS],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    requires = {canonical(k): v for k, v in json.loads(listing.stdout).items()}
    return venv / "bin", requires
