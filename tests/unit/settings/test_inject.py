"""``CP_TOKEN_INJECT_*``: defaults, and every mistake names its variable."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from cp_token.runtime.errors import ConfigError
from cp_token.settings.inject import InjectSettings, load_inject_settings


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    leaf = trustme.CA().issue_cert("cp-token-inject.ambient-code.svc")
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return {
        "CP_TOKEN_INJECT_TLS_CERT_FILE": str(cert),
        "CP_TOKEN_INJECT_TLS_KEY_FILE": str(key),
        "CP_TOKEN_INJECT_IMAGE": "registry.example.com/ambient/cp-token@sha256:" + "a" * 64,
        "CP_TOKEN_INJECT_CP_URL": "https://cp-token.ambient-code.svc:8080/token",
    }


def test_defaults(env: dict[str, str]) -> None:
    s = load_inject_settings(env)
    assert s == InjectSettings(
        image=env["CP_TOKEN_INJECT_IMAGE"],
        cp_url=env["CP_TOKEN_INJECT_CP_URL"],
        tls_cert_file=env["CP_TOKEN_INJECT_TLS_CERT_FILE"],
        tls_key_file=env["CP_TOKEN_INJECT_TLS_KEY_FILE"],
        audience="ambient-cp",
        token_expiration=3600,
        listen_host="0.0.0.0",
        listen_port=8443,
        metrics_host="0.0.0.0",
        metrics_port=9090,
        max_connections_per_client=256,
        log_level="info",
        log_format="json",
    )


def test_everything_set(env: dict[str, str]) -> None:
    s = load_inject_settings(
        {
            **env,
            "CP_TOKEN_INJECT_LISTEN_ADDR": "127.0.0.1:9443",
            "CP_TOKEN_METRICS_ADDR": "127.0.0.1:9191",
            "CP_TOKEN_INJECT_AUDIENCE": "my-cp",
            "CP_TOKEN_INJECT_TOKEN_EXPIRATION": "600",
            "CP_TOKEN_INJECT_CA_CONFIGMAP": "cp-token-ca",
            "CP_TOKEN_LOG_LEVEL": "debug",
            "CP_TOKEN_LOG_FORMAT": "text",
            "CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT": "0",
        }
    )
    assert s.max_connections_per_client == 0
    assert (s.listen_host, s.listen_port, s.metrics_port) == ("127.0.0.1", 9443, 9191)
    assert (s.audience, s.token_expiration) == ("my-cp", 600)
    assert s.ca_configmap == "cp-token-ca"
    assert (s.log_level, s.log_format) == ("debug", "text")


@pytest.mark.parametrize(
    ("change", "variable"),
    [
        ({"CP_TOKEN_INJECT_TLS_CERT_FILE": None}, "CP_TOKEN_INJECT_TLS_CERT_FILE"),
        ({"CP_TOKEN_INJECT_TLS_KEY_FILE": ""}, "CP_TOKEN_INJECT_TLS_KEY_FILE"),
        (
            {"CP_TOKEN_INJECT_TLS_CERT_FILE": "/nonexistent/tls.crt"},
            "CP_TOKEN_INJECT_TLS_CERT_FILE",
        ),
        ({"CP_TOKEN_INJECT_IMAGE": None}, "CP_TOKEN_INJECT_IMAGE"),
        ({"CP_TOKEN_INJECT_IMAGE": "cp token:1"}, "CP_TOKEN_INJECT_IMAGE"),
        ({"CP_TOKEN_INJECT_IMAGE": "https://registry/cp-token"}, "CP_TOKEN_INJECT_IMAGE"),
        ({"CP_TOKEN_INJECT_CP_URL": None}, "CP_TOKEN_INJECT_CP_URL"),
        ({"CP_TOKEN_INJECT_CP_URL": "ftp://cp/token"}, "CP_TOKEN_INJECT_CP_URL"),
        ({"CP_TOKEN_INJECT_CP_URL": "http://user:pw@cp/token"}, "CP_TOKEN_INJECT_CP_URL"),
        ({"CP_TOKEN_INJECT_AUDIENCE": "a,b"}, "CP_TOKEN_INJECT_AUDIENCE"),
        ({"CP_TOKEN_INJECT_TOKEN_EXPIRATION": "599"}, "CP_TOKEN_INJECT_TOKEN_EXPIRATION"),
        ({"CP_TOKEN_INJECT_TOKEN_EXPIRATION": "1h"}, "CP_TOKEN_INJECT_TOKEN_EXPIRATION"),
        ({"CP_TOKEN_INJECT_TOKEN_EXPIRATION": str(2**32 + 1)}, "CP_TOKEN_INJECT_TOKEN_EXPIRATION"),
        ({"CP_TOKEN_INJECT_LISTEN_ADDR": "8443"}, "CP_TOKEN_INJECT_LISTEN_ADDR"),
        ({"CP_TOKEN_METRICS_ADDR": "host:99999"}, "CP_TOKEN_METRICS_ADDR"),
        ({"CP_TOKEN_LOG_LEVEL": "loud"}, "CP_TOKEN_LOG_LEVEL"),
        ({"CP_TOKEN_LOG_FORMAT": "xml"}, "CP_TOKEN_LOG_FORMAT"),
        ({"CP_TOKEN_INJECT_CA_CONFIGMAP": "CP_CA"}, "CP_TOKEN_INJECT_CA_CONFIGMAP"),
        ({"CP_TOKEN_INJECT_CA_CONFIGMAP": "ca/crt"}, "CP_TOKEN_INJECT_CA_CONFIGMAP"),
        ({"CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT": "-1"}, "CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT"),
        ({"CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT": "lots"}, "CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT"),
    ],
)
def test_mistakes_name_the_variable(
    env: dict[str, str], change: dict[str, str | None], variable: str
) -> None:
    for name, value in change.items():
        if value is None:
            env.pop(name)
        else:
            env[name] = value
    with pytest.raises(ConfigError) as err:
        load_inject_settings(env)
    assert err.value.variable == variable
    assert str(err.value).startswith(f"{variable}: ") and "\n" not in str(err.value)


def test_a_key_that_does_not_match_the_certificate(env: dict[str, str], tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    trustme.CA().issue_cert("x.example").private_key_pem.write_to_path(str(other))
    with pytest.raises(ConfigError) as err:
        load_inject_settings({**env, "CP_TOKEN_INJECT_TLS_KEY_FILE": str(other)})
    assert err.value.variable == "CP_TOKEN_INJECT_TLS_CERT_FILE"
    assert "CP_TOKEN_INJECT_TLS_KEY_FILE" in err.value.problem


def test_sealed_upstreams(env: dict[str, str]) -> None:
    plain = load_inject_settings(env)
    assert (plain.upstreams, plain.grpc_upstream) == ((), "")
    s = load_inject_settings(
        {
            **env,
            "CP_TOKEN_INJECT_UPSTREAMS": "api=https://api.example.com/v1/,files=https://f.example",
            "CP_TOKEN_INJECT_GRPC_UPSTREAM": "grpc.example.com:443",
        }
    )
    assert s.upstreams == (("api", "https://api.example.com/v1"), ("files", "https://f.example"))
    assert s.grpc_upstream == "grpc.example.com:443"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CP_TOKEN_INJECT_UPSTREAMS", "Api=https://a.example"),
        ("CP_TOKEN_INJECT_UPSTREAMS", "api"),
        ("CP_TOKEN_INJECT_UPSTREAMS", "api=http://api.example.com"),
        ("CP_TOKEN_INJECT_GRPC_UPSTREAM", "grpc.example.com"),
        ("CP_TOKEN_INJECT_GRPC_UPSTREAM", ":443"),
    ],
)
def test_bad_sealed_upstreams_name_their_variable(
    env: dict[str, str], name: str, value: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_inject_settings({**env, name: value})
    assert info.value.variable == name


def test_plaintext_upstreams_need_the_plaintext_permission(env: dict[str, str]) -> None:
    plain = {**env, "CP_TOKEN_INJECT_UPSTREAMS": "api=http://api.mesh.svc:8080"}
    with pytest.raises(ConfigError, match="AMBIENT_CP_ALLOW_PLAINTEXT"):
        load_inject_settings(plain)
    allowed = load_inject_settings({**plain, "AMBIENT_CP_ALLOW_PLAINTEXT": "true"})
    assert allowed.upstreams == (("api", "http://api.mesh.svc:8080"),)


PLAIN = "http://cp-token.ambient-code.svc:8080/token"


LOOPBACK = [
    "http://127.0.0.1:8080/token",
    "http://127.8.9.10/token",
    "http://localhost:8080/token",
    "http://[::1]:8080/token",
]


def test_the_injector_refuses_a_plain_cp_url(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_inject_settings({**env, "CP_TOKEN_INJECT_CP_URL": PLAIN})
    assert info.value.variable == "CP_TOKEN_INJECT_CP_URL"
    assert "AMBIENT_CP_ALLOW_PLAINTEXT=true" in str(info.value)
    for url in LOOPBACK:
        assert load_inject_settings({**env, "CP_TOKEN_INJECT_CP_URL": url}).cp_url == url


@pytest.mark.parametrize("name", ["Cp-Token-CA", "ca_bundle", "-ca", "a" * 254, "ca crt"])
def test_a_bad_configmap_name_names_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_inject_settings({**env, "CP_TOKEN_INJECT_CA_CONFIGMAP": name})
    assert info.value.variable == "CP_TOKEN_INJECT_CA_CONFIGMAP"


def test_the_plaintext_permission_and_the_ca_configmap_are_read(env: dict[str, str]) -> None:
    allowed = load_inject_settings(
        {**env, "CP_TOKEN_INJECT_CP_URL": PLAIN, "AMBIENT_CP_ALLOW_PLAINTEXT": "true"}
    )
    assert allowed.allow_plaintext and allowed.cp_url == PLAIN
    with_ca = load_inject_settings({**env, "CP_TOKEN_INJECT_CA_CONFIGMAP": "cp-token-ca"})
    assert with_ca.ca_configmap == "cp-token-ca"
    assert load_inject_settings(env).ca_configmap is None
