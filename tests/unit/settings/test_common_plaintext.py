"""SPEC "Transport security": the one plaintext rule of settings/common.py (``http://`` only to
a loopback host unless ``AMBIENT_CP_ALLOW_PLAINTEXT``), as each entry point applies it: the
sidecar's and the client's loaders, the client library's error, and ``cp-token get``,
``cp-token-sidecar`` and ``cp-token inject`` exiting 2 with one line naming both variables.
(The injector's loader and hand-over: settings/test_inject.py, inject/test_patch.py; the CP's
warning: commands/test_serve.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from cp_token.client import TokenError, TokenSource
from cp_token.runtime.errors import ConfigError
from cp_token.settings.client import load_client_settings
from cp_token.settings.sidecar import load_sidecar_settings

ROOT = Path(__file__).resolve().parents[3]
PLAIN = "http://cp-token.ambient-code.svc:8080/token"
LOOPBACK = [
    "http://127.0.0.1:8080/token",
    "http://127.8.9.10/token",
    "http://localhost:8080/token",
    "http://[::1]:8080/token",
]
ALLOWED = [*LOOPBACK, "https://cp-token.ambient-code.svc:8080/token"]


def sidecar(url: str, **extra: str) -> Any:
    return load_sidecar_settings({"AMBIENT_CP_TOKEN_URL": url, **extra})


def client(url: str, **extra: str) -> Any:
    return load_client_settings({"AMBIENT_CP_TOKEN_URL": url, **extra})


LOADERS: list[Callable[..., Any]] = [sidecar, client]


@pytest.mark.parametrize("load", LOADERS, ids=["sidecar", "client"])
def test_plain_http_to_another_host_is_refused(load: Callable[..., Any]) -> None:
    with pytest.raises(ConfigError) as info:
        load(PLAIN)
    assert info.value.variable == "AMBIENT_CP_TOKEN_URL"
    line = str(info.value)
    assert line.startswith("AMBIENT_CP_TOKEN_URL: ")
    assert "AMBIENT_CP_ALLOW_PLAINTEXT=true" in line and "\n" not in line
    # "false" is the default, said out loud
    with pytest.raises(ConfigError):
        load(PLAIN, AMBIENT_CP_ALLOW_PLAINTEXT="false")


@pytest.mark.parametrize("load", LOADERS, ids=["sidecar", "client"])
def test_plain_http_is_allowed_when_asked_for(load: Callable[..., Any]) -> None:
    settings = load(PLAIN, AMBIENT_CP_ALLOW_PLAINTEXT="true")
    assert settings.cp_token_url == PLAIN and settings.allow_plaintext is True
    with pytest.raises(ConfigError) as info:
        load(PLAIN, AMBIENT_CP_ALLOW_PLAINTEXT="maybe")
    assert info.value.variable == "AMBIENT_CP_ALLOW_PLAINTEXT"


@pytest.mark.parametrize("load", LOADERS, ids=["sidecar", "client"])
@pytest.mark.parametrize("url", ALLOWED)
def test_loopback_and_https_need_no_permission(load: Callable[..., Any], url: str) -> None:
    assert load(url).cp_token_url == url


def test_the_client_library_raises_a_token_error_naming_both() -> None:
    with pytest.raises(TokenError) as info:
        TokenSource.from_env({"AMBIENT_CP_TOKEN_URL": PLAIN})
    assert "AMBIENT_CP_TOKEN_URL" in str(info.value)
    assert "AMBIENT_CP_ALLOW_PLAINTEXT" in str(info.value)


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CP_TOKEN_", "SIDECAR_", "AMBIENT_", "BOT_TOKEN", "KUBECONFIG"))
    }
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**clean, **env},
    )


@pytest.mark.parametrize(
    ("args", "prog"),
    [(["-m", "cp_token", "get"], "cp-token get"), (["-m", "sidecar"], "cp-token-sidecar")],
    ids=["cp-token get", "cp-token-sidecar"],
)
def test_commands_exit_2_with_one_line(args: list[str], prog: str, tmp_path: Path) -> None:
    sa = tmp_path / "sa"
    sa.write_text("sa-token")
    done = run(args, AMBIENT_CP_TOKEN_URL=PLAIN, AMBIENT_SA_TOKEN_FILE=str(sa))
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"{prog}: AMBIENT_CP_TOKEN_URL: ")
    assert "AMBIENT_CP_ALLOW_PLAINTEXT" in line
    assert done.stdout == ""


# --------------------------------------------------------------------------- the injector


@pytest.fixture
def inject_env(tmp_path: Path) -> dict[str, str]:
    leaf = trustme.CA().issue_cert("cp-token-inject.ambient-code.svc")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return {
        "CP_TOKEN_INJECT_TLS_CERT_FILE": str(cert),
        "CP_TOKEN_INJECT_TLS_KEY_FILE": str(key),
        "CP_TOKEN_INJECT_IMAGE": "cp-token:1",
        "CP_TOKEN_INJECT_CP_URL": "https://cp-token.ambient-code.svc:8080/token",
    }


def test_the_injector_exits_2_naming_both(inject_env: dict[str, str]) -> None:
    done = run(["-m", "cp_token", "inject"], **{**inject_env, "CP_TOKEN_INJECT_CP_URL": PLAIN})
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("cp-token: CP_TOKEN_INJECT_CP_URL: ")
    assert "AMBIENT_CP_ALLOW_PLAINTEXT" in line


# --------------------------------------------------------------------------- the CP


STATIC = {
    "CP_TOKEN_AUTHN": "static",
    "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ROOT / "examples" / "config" / "dev-identities.json"),
    "CP_TOKEN_MINTER": "static",
    "CP_TOKEN_STATIC_TOKEN": "t",
}
