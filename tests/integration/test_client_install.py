"""``pip install cp-token`` (no extras) into a fresh venv installs httpx's closure and
nothing else; the client's command works there, and a server command names its extra.

The package is built from a copy of the sources (pip builds in place and would otherwise
write build/ and *.egg-info into the work tree while other tests run). pip reaches its
cache and registry as configured on the machine.
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

LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name']: d.requires or [] for d in m.distributions()}))"
)


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, requires: dict[str, list[str]], environment: dict[str, str]) -> set[str]:
    """``root`` and every distribution it requires, transitively, on this interpreter
    (requirements behind an extra or a marker that does not hold are left out)."""
    seen: set[str] = set()
    todo = [canonical(root)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for raw in requires.get(name, []):
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({**environment, "extra": ""}):
                todo.append(canonical(req.name))
    return seen


def test_a_plain_install_is_the_client_and_httpx_only(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("cp_token", "sidecar"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = clean_env({"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", str(src)],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    listing = subprocess.run(
        [str(python), "-c", LIST_DISTRIBUTIONS], capture_output=True, text=True, env=env
    )
    requires = {canonical(k): v for k, v in json.loads(listing.stdout).items()}
    assert "cp-token" in requires
    environment: dict[str, str] = dict(default_environment())  # type: ignore[arg-type]
    expected = closure("httpx", requires, environment)
    assert {"httpx", "httpcore", "h11", "certifi", "idna", "anyio"} <= expected
    assert set(requires) - {"cp-token"} == expected
    assert closure("cp-token", requires, environment) == expected | {"cp-token"}

    bin_dir = venv / "bin"
    got = subprocess.run(
        [str(bin_dir / "cp-token"), "get"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env({"BOT_TOKEN": "bot-from-a-plain-install"}),
    )
    assert (got.returncode, got.stdout) == (0, "bot-from-a-plain-install\n"), got.stderr

    for command in (["cp-token", "serve"], ["cp-token", "dev"], ["cp-token-sidecar"]):
        done = subprocess.run(
            [str(bin_dir / command[0]), *command[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env({"AMBIENT_CP_TOKEN_URL": "http://127.0.0.1:9/token"}),
        )
        assert done.returncode == 2, (command, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1, (command, done.stderr)
        assert lines[0].startswith(" ".join(command) + ": ")
        assert "pip install 'cp-token[server]'" in lines[0]
