"""The client library's configuration: which source decides, a sealed pod, the connection variables
shared with the sidecar."""

from __future__ import annotations

from pathlib import Path

import pytest

from cp_token.runtime.errors import ConfigError
from cp_token.settings.client import (
    DEFAULT_SA_TOKEN_FILE,
    SA_TOKEN_DIR,
    TIMEOUT,
    load_client_settings,
    upstream_fields,
)
from cp_token.settings.common import Env


def test_client_resolution_order() -> None:
    both = {
        "AMBIENT_TOKEN_SIDECAR_URL": "http://127.0.0.1:8099/token",
        "AMBIENT_CP_TOKEN_URL": "https://cp/token",
        "BOT_TOKEN": "b",
    }
    assert load_client_settings(both).source == "sidecar"
    del both["AMBIENT_TOKEN_SIDECAR_URL"]
    assert load_client_settings(both).source == "direct"
    assert load_client_settings({"BOT_TOKEN": "b"}).source == "bot"
    assert load_client_settings({}).source == "none"


def test_a_sealed_pod_has_no_token_source_whatever_else_is_set() -> None:
    env = {"BOT_TOKEN": "b", "AMBIENT_TOKEN_SIDECAR_URL": "http://127.0.0.1:8099/token"}
    assert load_client_settings(env).source == "sidecar"
    api = load_client_settings({**env, "AMBIENT_API_URL": "http://127.0.0.1:8099/upstream/api"})
    assert api.sealed and api.source == "sealed"
    grpc = load_client_settings({**env, "AMBIENT_GRPC_ADDR": "127.0.0.1:9090"})
    assert grpc.sealed and grpc.source == "sealed" and grpc.grpc_addr == "127.0.0.1:9090"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:9090", "127.0.0.1:9090"), ("[::1]:9090", "[::1]:9090"), (":9090", "0.0.0.0:9090")],
)
def test_the_grpc_address_is_host_port_with_ipv6_in_brackets(value: str, expected: str) -> None:
    assert load_client_settings({"AMBIENT_GRPC_ADDR": value}).grpc_addr == expected


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AMBIENT_GRPC_ADDR", "localhost"),
        ("AMBIENT_GRPC_ADDR", "127.0.0.1:99999"),
        ("AMBIENT_API_URL", "ftp://api.example/"),
        ("AMBIENT_TOKEN_SIDECAR_URL", "http://user:pw@127.0.0.1:8099/token"),
        ("AMBIENT_CP_TOKEN_TIMEOUT_SECS", "0"),
        ("AMBIENT_CP_TOKEN_TIMEOUT_SECS", "soon"),
        ("AMBIENT_CP_CA_FILE", "/nonexistent/ca.pem"),
    ],
)
def test_a_bad_value_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_client_settings({variable: value})
    assert info.value.variable == variable


def test_the_connection_variables_are_read_the_same_for_the_sidecar(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env = {
        "AMBIENT_SA_TOKEN_FILE": str(tmp_path / "sa"),
        "AMBIENT_CP_CA_FILE": str(ca),
        "AMBIENT_CP_TOKEN_TIMEOUT_SECS": "2.5",
    }
    fields = upstream_fields(Env(env))
    assert fields == {"sa_token_file": str(tmp_path / "sa"), "ca_file": str(ca), "timeout": 2.5}
    client = load_client_settings(env)
    assert (client.sa_token_file, client.ca_file, client.timeout) == (
        str(tmp_path / "sa"),
        str(ca),
        2.5,
    )
    defaults = upstream_fields(Env({}))
    assert defaults == {"sa_token_file": DEFAULT_SA_TOKEN_FILE, "ca_file": None, "timeout": TIMEOUT}
    assert DEFAULT_SA_TOKEN_FILE == f"{SA_TOKEN_DIR}/ambient-cp"


@pytest.mark.parametrize(
    ("env", "decides"),
    [
        (  # the sidecar decides: a broken direct URL or a stray BOT_TOKEN is never read
            {
                "AMBIENT_TOKEN_SIDECAR_URL": "http://127.0.0.1:8099/token",
                "AMBIENT_CP_TOKEN_URL": "http://cp.example/token",  # plaintext: refused if read
                "BOT_TOKEN": "stray",
            },
            "sidecar",
        ),
        (
            {"AMBIENT_CP_TOKEN_URL": "https://cp.example/token", "BOT_TOKEN": "stray"},
            "direct",
        ),
    ],
)
def test_only_the_deciding_source_is_read(env: dict[str, str], decides: str) -> None:
    s = load_client_settings(env)
    assert s.source == decides
    assert s.bot_token is None
    if decides == "sidecar":
        assert s.cp_token_url is None
