"""``pip install cp-token`` (no extras) into a fresh venv installs httpx's closure and
nothing else; the client's command works there, and a server command names its extra.

pip reaches its cache and registry as configured on the machine.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.install import closure, install_into_fresh_venv
from tests.integration.procs import clean_env


def test_a_plain_install_is_the_client_and_httpx_only(tmp_path: Path) -> None:
    bin_dir, requires = install_into_fresh_venv(tmp_path)
    assert "cp-token" in requires
    expected = closure("httpx", requires)
    assert {"httpx", "httpcore", "h11", "certifi", "idna", "anyio"} <= expected
    assert set(requires) - {"cp-token"} == expected
    assert closure("cp-token", requires) == expected | {"cp-token"}

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
