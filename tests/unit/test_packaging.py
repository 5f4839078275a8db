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

from cp_token.extras import SERVER_MODULES, missing_server_modules, run_server_command

ROOT = Path(__file__).resolve().parents[2]

# What the client side may load of this project (the client, its settings, and the stdlib-only
# helpers it shares with the servers); anything else of cp_token is server side.
CLIENT_SIDE = re.compile(
    r"cp_token(\.(client(\..+)?|settings(\.(common|client))?|clock|backoff|singleflight|cli"
    r"|get_cmd|extras|__main__))?"
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
        "from cp_token.client import TokenAuth, TokenSource; import cp_token.get_cmd",
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


def test_missing_modules_are_found_without_importing_them() -> None:
    assert missing_server_modules(["json", "no_such_module_xyz"]) == ["no_such_module_xyz"]
    assert "no_such_module_xyz" not in sys.modules
    assert missing_server_modules() == []  # the dev environment has the extra


def test_run_server_command_calls_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_server_command("prog", "json:dumps", 5) == "5"
    assert capsys.readouterr().err == ""


def test_the_sidecar_loads_neither_httpx_nor_the_cp() -> None:
    """What a sidecar process imports: its server (uvicorn), the client library's errors and
    answer parsing, and its own small HTTP client; no httpx (about 5 MiB per pod), no
    Starlette, no prometheus_client, nothing of the CP."""
    done = run_python(
        "-c",
        "import json, sys, sidecar.cli, sidecar.__main__\nprint(json.dumps(sorted(sys.modules)))",
    )
    loaded = set(json.loads(done.stdout))
    assert {"uvicorn", "sidecar.upstream", "cp_token.client._http"} <= loaded
    heavy = {"httpx", "httpcore", "anyio", "starlette", "prometheus_client", "kubernetes"}
    heavy |= {"joserfc", "cryptography", "cachetools", "urllib3"}
    assert {m.partition(".")[0] for m in loaded} & heavy == set()
    ours = {m for m in loaded if m.partition(".")[0] == "cp_token"}
    assert ours <= {
        "cp_token",
        "cp_token.client",
        "cp_token.client._errors",
        "cp_token.client._http",
        "cp_token.client._retry",
        "cp_token.backoff",
        "cp_token.clock",
        "cp_token.settings",
        "cp_token.settings.client",
        "cp_token.settings.common",
        "cp_token.settings.sidecar",
        "cp_token.edge",  # the HTTP limits every server applies (SPEC: the sidecar too)
        "cp_token.framing",  # the edge's request framing (stdlib only)
        "cp_token.extras",
        "cp_token.logs",
        "cp_token.serving",
        "cp_token.singleflight",
    }, ours
