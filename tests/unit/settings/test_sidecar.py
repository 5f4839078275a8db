"""The sidecar's sealed-mode variables: defaults, and every mistake names its variable."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from cp_token.runtime.errors import ConfigError
from cp_token.settings.sidecar import (
    GRPC_LISTEN_ADDR,
    SidecarSettings,
    load_sidecar_settings,
    parse_grpc_target,
    parse_upstreams,
)

BASE = {"AMBIENT_CP_TOKEN_URL": "http://127.0.0.1:8080/token"}
SEALED = {**BASE, "SIDECAR_SEALED": "true", "SIDECAR_UPSTREAMS": "api=https://api.example.com"}


def error(env: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_sidecar_settings(env)
    return info.value


def test_defaults_are_the_plain_sidecar() -> None:
    s = load_sidecar_settings(BASE)
    assert (s.sealed, s.upstreams, s.grpc_upstream, s.upstream_ca_file) == (False, (), None, None)
    assert s.upstream_timeout == 30.0
    assert (s.grpc_listen_host, s.grpc_listen_port) == ("127.0.0.1", 8098)
    assert GRPC_LISTEN_ADDR == "127.0.0.1:8098"
    assert s == SidecarSettings(BASE["AMBIENT_CP_TOKEN_URL"])


def test_everything_sealed(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    s = load_sidecar_settings(
        {
            **BASE,
            "SIDECAR_SEALED": "true",
            "SIDECAR_UPSTREAMS": " api=https://api.example.com/v1/ , files-2=https://f.example:8443,",
            "SIDECAR_UPSTREAM_CA_FILE": str(ca),
            "SIDECAR_UPSTREAM_TIMEOUT_SECS": "2.5",
            "SIDECAR_GRPC_UPSTREAM": "grpc.example.com:443",
            "SIDECAR_GRPC_LISTEN_ADDR": "[::1]:9000",
        }
    )
    assert s.sealed
    assert s.upstreams == (
        ("api", "https://api.example.com/v1"),
        ("files-2", "https://f.example:8443"),
    )
    assert (s.upstream_ca_file, s.upstream_timeout) == (str(ca), 2.5)
    assert s.grpc_upstream == "grpc.example.com:443"
    assert (s.grpc_listen_host, s.grpc_listen_port) == ("::1", 9000)


def test_grpc_alone_is_enough_to_seal() -> None:
    s = load_sidecar_settings({**BASE, "SIDECAR_SEALED": "true", "SIDECAR_GRPC_UPSTREAM": "g:443"})
    assert s.sealed and s.upstreams == () and s.grpc_upstream == "g:443"


def test_a_sealed_sidecar_writes_no_token_file(tmp_path: Path) -> None:
    exc = error({**SEALED, "SIDECAR_TOKEN_FILE": str(tmp_path / "token")})
    assert exc.variable == "SIDECAR_TOKEN_FILE" and "SIDECAR_SEALED" in exc.problem


def test_a_sealed_sidecar_needs_an_upstream() -> None:
    exc = error({**BASE, "SIDECAR_SEALED": "true"})
    assert exc.variable == "SIDECAR_UPSTREAMS" and "SIDECAR_GRPC_UPSTREAM" in exc.problem
    exc = error({**BASE, "SIDECAR_SEALED": "true", "SIDECAR_UPSTREAMS": " , "})
    assert exc.variable == "SIDECAR_UPSTREAMS"


def test_upstreams_without_sealing_are_allowed() -> None:
    """The egress routes are served whenever configured; only sealing hides the token."""
    s = load_sidecar_settings({**BASE, "SIDECAR_UPSTREAMS": "api=https://a.example"})
    assert not s.sealed and s.upstreams == (("api", "https://a.example"),)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("api", "is not name="),
        ("api=", "is not name="),
        ("=https://a.example", "must be lower-case"),
        ("API=https://a.example", "must be lower-case"),
        ("a_b=https://a.example", "must be lower-case"),
        ("a.b=https://a.example", "must be lower-case"),
        ("a=https://a.example,a=https://b.example", "given twice"),
        ("a=ftp://a.example", "http:// or https://"),
        ("a=https://user:pw@a.example", "user-info"),
        ("a=https://a.example/v1?x=1", "no query or fragment"),
        ("a=https://a.example/#top", "no query or fragment"),
        ("a=https://a.example:99999", "Port"),
        ("a=https://", "no host"),
        ("a=http://api.example.com", "AMBIENT_CP_ALLOW_PLAINTEXT"),
    ],
)
def test_bad_upstreams_name_the_variable(value: str, fragment: str) -> None:
    exc = error({**BASE, "SIDECAR_UPSTREAMS": value})
    assert exc.variable == "SIDECAR_UPSTREAMS"
    assert fragment in exc.problem
    assert "pw" not in str(exc)


def test_plaintext_upstreams_follow_the_cp_rules() -> None:
    """http:// to loopback is always allowed; elsewhere only with AMBIENT_CP_ALLOW_PLAINTEXT."""
    assert parse_upstreams("V", "a=http://127.0.0.1:9000,b=http://localhost", False) == (
        ("a", "http://127.0.0.1:9000"),
        ("b", "http://localhost"),
    )
    env = {
        **BASE,
        "SIDECAR_UPSTREAMS": "a=http://api.mesh.svc",
        "AMBIENT_CP_ALLOW_PLAINTEXT": "true",
    }
    assert load_sidecar_settings(env).upstreams == (("a", "http://api.mesh.svc"),)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (":443", "no host"),
        ("grpc.example.com", "host:port"),
        ("https://grpc.example.com:443", "without a scheme"),
        ("g:0", "port 0"),
        ("g:70000", "out of range"),
    ],
)
def test_bad_grpc_upstreams_name_the_variable(value: str, fragment: str) -> None:
    exc = error({**BASE, "SIDECAR_GRPC_UPSTREAM": value})
    assert exc.variable == "SIDECAR_GRPC_UPSTREAM" and fragment in exc.problem


def test_grpc_targets_keep_ipv6_brackets() -> None:
    assert parse_grpc_target("V", "[fd00::1]:443") == "[fd00::1]:443"
    assert parse_grpc_target("V", "10.0.0.1:50051") == "10.0.0.1:50051"


def test_the_grpc_listener_is_loopback_only() -> None:
    for addr in ("0.0.0.0:8098", ":8098", "10.0.0.1:8098"):
        exc = error({**BASE, "SIDECAR_GRPC_LISTEN_ADDR": addr})
        assert exc.variable == "SIDECAR_GRPC_LISTEN_ADDR" and "loopback" in exc.problem
    env = {**BASE, "SIDECAR_GRPC_LISTEN_ADDR": "0.0.0.0:8098", "SIDECAR_ALLOW_NON_LOOPBACK": "true"}
    assert load_sidecar_settings(env).grpc_listen_host == "0.0.0.0"


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_a_bad_upstream_timeout_names_its_variable(value: str) -> None:
    assert error({**SEALED, "SIDECAR_UPSTREAM_TIMEOUT_SECS": value}).variable == (
        "SIDECAR_UPSTREAM_TIMEOUT_SECS"
    )


def test_the_upstream_ca_file_must_load(tmp_path: Path) -> None:
    missing = error({**SEALED, "SIDECAR_UPSTREAM_CA_FILE": str(tmp_path / "nope.pem")})
    assert missing.variable == "SIDECAR_UPSTREAM_CA_FILE"
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    bad = error({**SEALED, "SIDECAR_UPSTREAM_CA_FILE": str(junk)})
    assert bad.variable == "SIDECAR_UPSTREAM_CA_FILE" and "PEM" in bad.problem


def test_sealed_must_be_a_boolean() -> None:
    assert error({**SEALED, "SIDECAR_SEALED": "yes please"}).variable == "SIDECAR_SEALED"
