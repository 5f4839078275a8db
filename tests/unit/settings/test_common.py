"""The settings package: the typed reader, one source for every default, and each component
loading only its own module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cp_token.http.serving import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_CLIENT
from cp_token.inject.patch import SA_TOKEN_PATH, SIDECAR_ADDR
from cp_token.policy import RunnerPolicy
from cp_token.runtime.errors import ConfigError
from cp_token.settings.client import DEFAULT_SA_TOKEN_FILE, ClientSettings, load_client_settings
from cp_token.settings.common import Env
from cp_token.settings.cp import Settings, load_settings
from cp_token.settings.inject import InjectSettings
from cp_token.settings.sidecar import LISTEN_ADDR, SidecarSettings, load_sidecar_settings
from sidecar.holder import HolderPolicy

ROOT = Path(__file__).resolve().parents[3]
OIDC = {
    "OIDC_TOKEN_URL": "https://idp.example/oauth/token",
    "OIDC_CLIENT_ID": "cp",
    "OIDC_CLIENT_SECRET": "s3cret",
}


def test_env_strips_and_treats_empty_as_unset() -> None:
    e = Env({"A": "  x ", "B": "", "C": " "})
    assert (e.get("A"), e.get("B"), e.get("C"), e.get("D")) == ("x", None, None, None)
    assert e.raw("A") == "  x "


def test_env_lists_empty_means_none_unset_means_default() -> None:
    e = Env({"L": " a, ,b ", "E": ""})
    assert e.items("L", ("d",)) == ("a", "b")
    assert e.items("E", ("d",)) == ()
    assert e.items("U", ("d",)) == ("d",)


def test_env_overrides_win() -> None:
    assert Env({"A": "1"}, {"A": "2"}).count("A", 0) == 2


@pytest.mark.parametrize(
    ("read", "value"),
    [
        (lambda e: e.required("V", "required: something"), ""),
        (lambda e: e.url("V"), "ftp://x"),
        (lambda e: e.file("V"), "/nonexistent/file"),
        (lambda e: e.addr("V", ":1"), "nope"),
        (lambda e: e.flag("V", False), "maybe"),
        (lambda e: e.number("V", 1.0, minimum=1), "0.5"),
        (lambda e: e.count("V", 1), "1.5"),
        (lambda e: e.choice("V", "a", ("a", "b")), "c"),
    ],
)
def test_every_read_names_its_variable(read: object, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        read(Env({"V": value}))  # type: ignore[operator]
    assert info.value.variable == "V"
    assert str(info.value).startswith("V: ") and "\n" not in str(info.value)


def test_env_logging_reads_both_variables() -> None:
    e = Env({"X_LEVEL": "DEBUG"})
    assert e.logging("X_LEVEL", "X_FORMAT") == {"log_level": "debug", "log_format": "json"}


def test_the_loaders_defaults_are_the_dataclasses() -> None:
    """Each default is written once, in the dataclass: loading an empty environment (but for
    what is required) gives the dataclass's defaults."""
    assert load_settings(OIDC) == Settings(
        oidc_token_url=OIDC["OIDC_TOKEN_URL"],
        oidc_client_id="cp",
        oidc_client_secret="s3cret",
    )
    url = "https://cp:8080/token"
    assert load_sidecar_settings({"AMBIENT_CP_TOKEN_URL": url}) == SidecarSettings(url)
    assert load_client_settings({}) == ClientSettings()


def test_shared_defaults_have_one_source() -> None:
    assert RunnerPolicy().allowed_sa == Settings().allowed_sa
    assert Settings().max_connections == DEFAULT_MAX_CONNECTIONS
    assert Settings().max_connections_per_client == DEFAULT_MAX_CONNECTIONS_PER_CLIENT == 256
    assert InjectSettings("img", "u").max_connections_per_client == 256
    assert HolderPolicy().refresh_fraction == SidecarSettings("u").refresh_fraction
    assert SIDECAR_ADDR == LISTEN_ADDR == "127.0.0.1:8099"
    # pods project their token for the CP's audience, into the file the sidecar reads
    audience = Settings().audiences[0]
    assert InjectSettings("img", "u").audience == audience == SA_TOKEN_PATH
    assert DEFAULT_SA_TOKEN_FILE.endswith(f"/{audience}")


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("1", 1), (" 512 ", 512)])
def test_the_per_client_cap(value: str, expected: int) -> None:
    env = {**OIDC, "CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT": value}
    assert load_settings(env).max_connections_per_client == expected


@pytest.mark.parametrize("value", ["-1", "2.5", "many", "1e3x"])
def test_a_bad_per_client_cap_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**OIDC, "CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT": value})
    assert info.value.variable == "CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT"


def loaded_by(module: str) -> set[str]:
    """The project's settings modules a fresh interpreter loads with ``module``."""
    code = f"import json, sys, {module}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return {m for m in json.loads(done.stdout) if m.startswith("cp_token.settings")}


def test_components_load_only_their_own_settings() -> None:
    assert loaded_by("cp_token.settings.client") == {
        "cp_token.settings",
        "cp_token.settings.common",
        "cp_token.settings.client",
    }
    assert "cp_token.settings.cp" not in loaded_by("cp_token.settings.sidecar")
