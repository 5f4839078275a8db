"""The client installs alone: ``cp_token.client`` and ``cp-token get`` import nothing of the
server side, and a server command without the ``server`` extra says which extra to install.

"Not installed" is simulated in a subprocess by a meta-path finder that refuses the server
extra's modules, so these run in the full dev environment; the real thing (a fresh venv
with plain ``pip install``) is tests/integration/test_client_install.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cp_token.extras import SERVER_MODULES

ROOT = Path(__file__).resolve().parents[3]

# What the client side may load at run time of this project: the client, its settings, the
# stdlib-only runtime primitives and `cp-token get`; anything else of cp_token is server side.
# (Which package may import which is the import-linter contract in pyproject.toml; this checks
# what a process really loads, i.e. what a client-only install must carry.)
CLIENT_SIDE = re.compile(
    r"cp_token(\.(client(\..+)?|settings(\.(common|client))?|runtime(\..+)?|cli"
    r"|commands(\.get)?|extras|__main__))?"
    r"|sidecar(\.__main__)?"
)

BLOCKER = f"""
import sys
BLOCKED = {sorted(SERVER_MODULES.values())!r}
class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""


def run_blocked(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter where the server extra looks uninstalled."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CP_TOKEN_", "SIDECAR_", "AMBIENT_", "BOT_TOKEN", "KUBECONFIG"))
    }
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**clean, **env},
    )


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    """``python *args`` in the full dev environment, from the repository root."""
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return done


def server_side(modules: list[str]) -> list[str]:
    """The loaded modules that belong to the server side."""
    blocked = set(SERVER_MODULES.values())
    return [
        m
        for m in modules
        if m.partition(".")[0] in blocked
        or (m.partition(".")[0] in ("cp_token", "sidecar") and not CLIENT_SIDE.fullmatch(m))
    ]


def test_the_client_imports_nothing_server_side_even_when_it_is_installed() -> None:
    """``python -X importtime``: every module the import loads, in the full environment."""
    done = run_python(
        "-X",
        "importtime",
        "-c",
        "from cp_token.client import TokenAuth, TokenSource; import cp_token.commands.get",
    )
    loaded = [
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    ]
    assert "httpx" in loaded  # the parse is right: the client's one dependency shows up
    assert "cp_token.client._source" in loaded
    assert server_side(loaded) == []


def test_the_client_works_with_the_server_extra_missing() -> None:
    done = run_blocked(
        "import json, cp_token.client\n"
        "source = cp_token.client.TokenSource.from_env()\n"
        "assert source.token() == 'bot-123'\n"
        "print(json.dumps(sorted(sys.modules)))\n",
        BOT_TOKEN="bot-123",
    )
    assert done.returncode == 0, done.stderr
    assert server_side(json.loads(done.stdout)) == []


def test_cp_token_get_runs_with_the_server_extra_missing() -> None:
    done = run_blocked(
        "from cp_token.cli import main\n"
        "code = main(['get'])\n"
        "print(sorted(sys.modules), file=sys.stderr)\n"
        "sys.exit(code)\n",
        BOT_TOKEN="bot-456",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "bot-456\n"
    assert "starlette" not in done.stderr and "uvicorn" not in done.stderr


@pytest.mark.parametrize(
    ("code", "prog"),
    [
        ("from cp_token.cli import main; sys.exit(main(['serve']))", "cp-token serve"),
        ("from cp_token.cli import main; sys.exit(main(['dev']))", "cp-token dev"),
        ("import runpy; runpy.run_module('sidecar', run_name='__main__')", "cp-token-sidecar"),
        ("from sidecar.__main__ import main; sys.exit(main())", "cp-token-sidecar"),
    ],
)
def test_a_server_command_without_the_extra_names_it(code: str, prog: str) -> None:
    done = run_blocked(code, AMBIENT_CP_TOKEN_URL="http://127.0.0.1:9/token")
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{prog}: ")
    assert "pip install 'cp-token[server]'" in lines[0]
    assert "Traceback" not in done.stderr


def test_the_extra_list_matches_pyproject() -> None:
    """Every distribution of the ``server`` extra is checked, and nothing else."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    server = project["optional-dependencies"]["server"]
    names = {re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower() for req in server}
    assert names == set(SERVER_MODULES)
    assert project["dependencies"] == ["httpx>=0.27"]
    assert "cp-token[server]" in project["optional-dependencies"]["dev"]


def test_the_sidecar_loads_neither_httpx_nor_the_cp() -> None:
    """What a sidecar process imports: its server (uvicorn), the client library's errors and
    answer parsing, and its own small HTTP client (httptools' parser, as its server's); no
    httpx (about 5 MiB per pod), no h11, no Starlette, no prometheus_client, nothing of the
    CP."""
    done = run_python(
        "-c",
        "import json, sys, sidecar.cli, sidecar.__main__\nprint(json.dumps(sorted(sys.modules)))",
    )
    loaded = set(json.loads(done.stdout))
    assert {"uvicorn", "httptools", "sidecar.upstream", "sidecar.egress_pool"} <= loaded
    assert "cp_token.client._http" in loaded
    heavy = {"httpx", "httpcore", "h11", "anyio", "starlette", "prometheus_client", "kubernetes"}
    heavy |= {"joserfc", "cryptography", "cachetools", "urllib3"}
    assert {m.partition(".")[0] for m in loaded} & heavy == set()
    ours = {m for m in loaded if m.partition(".")[0] == "cp_token"}
    # the client library, settings, the stdlib primitives and the shared HTTP edge: never the CP
    allowed = re.compile(r"cp_token(\.(client|settings|runtime|http)(\..+)?|\.extras)?")
    assert {m for m in ours if not allowed.fullmatch(m)} == set(), ours
    assert "cp_token.http.serving" in ours  # the pattern is live: the sidecar serves through it


# --------------------------------------------------------------------------- releases


def lock_pins() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock as {canonical name: (pinned version, its sha256 hashes)}."""
    text = (ROOT / "requirements.lock").read_text().replace("\\\n", " ")
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert m, f"requirements.lock: not a hashed pin: {line[:80]}"
        hashes = re.findall(r"sha256:([0-9a-f]{64})", m.group(3))
        pins[canonical(m.group(1))] = (m.group(2), hashes)
    return pins


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def server_closure() -> dict[str, list[str]]:
    """Every distribution ``cp-token[server]`` needs on this interpreter, with the
    requirement strings that ask for it (read from the installed distributions' metadata)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    wanted: dict[str, list[str]] = {}
    todo = [(Requirement("cp-token[server]"), "")]
    while todo:
        req, asked_by = todo.pop()
        name = canonical(req.name)
        first = name not in wanted
        wanted.setdefault(name, []).append(f"{asked_by}: {req}" if asked_by else str(req))
        if not first:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            pytest.fail(f"{name} is required but not installed ({req})")
        for raw in dist.requires or []:
            child = Requirement(raw)
            extras = ["", *sorted(req.extras)]
            env = default_environment()
            if child.marker is None or any(
                child.marker.evaluate({**env, "extra": e}) for e in extras
            ):
                todo.append((child, name))
    del wanted["cp-token"]
    return wanted


def test_the_lock_pins_everything_the_server_extra_needs_with_hashes() -> None:
    """The image installs requirements.lock with --require-hashes and nothing else: every
    distribution of the `server` extra's closure is pinned, with hashes, at a version every
    requirement on it accepts."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = lock_pins()
    closure = server_closure()
    assert {"starlette", "uvicorn", "kubernetes", "httpx", "h11"} <= set(closure)
    missing = sorted(set(closure) - set(pins))
    assert not missing, f"requirements.lock lacks {missing}: run `make lock`"
    for name, asks in closure.items():
        version, hashes = pins[name]
        assert hashes, name
        for ask in asks:
            req = Requirement(ask.rsplit(": ", 1)[-1])
            assert req.specifier.contains(Version(version), prereleases=True), (name, ask)
    # nothing of the test and lint tools goes into the image
    assert not {"pytest", "mypy", "ruff", "hypothesis", "pip-tools"} & set(pins)


def test_the_dockerfile_installs_the_lock_with_hashes() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY requirements.lock" in dockerfile
    assert re.search(r"pip install --require-hashes\b.*-r requirements\.lock", dockerfile)
    # the project itself adds no dependency the lock did not decide
    assert re.search(r"pip install --no-deps /dist/\*\.whl", dockerfile)
    assert "pip check" in dockerfile
    assert "lock:" in (ROOT / "Makefile").read_text()


def test_package_metadata() -> None:
    """License, classifiers, project URLs, and the PEP 561 marker of both typed packages."""
    from importlib.metadata import metadata

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert project["project"]["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    classifiers = project["project"]["classifiers"]
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]  # PEP 639: the expression
    urls = project["project"]["urls"]
    assert {"Homepage", "Documentation", "Changelog", "Issues"} <= set(urls)
    assert all(u.startswith("https://") for u in urls.values())
    package_data = project["tool"]["setuptools"]["package-data"]
    for package in ("cp_token", "sidecar"):
        assert (ROOT / package / "py.typed").is_file()
        assert package_data[package] == ["py.typed"]
    installed = metadata("cp-token")  # as built from pyproject.toml
    assert installed["License-Expression"] == "MIT"
    assert "Typing :: Typed" in installed.get_all("Classifier")
