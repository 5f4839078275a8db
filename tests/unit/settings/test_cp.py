"""Configuration: defaults, validation, and the one-line errors that exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from cp_token.runtime.errors import ConfigError
from cp_token.settings.common import parse_addr, redacted
from cp_token.settings.cp import issuer_from_url, load_settings
from cp_token.settings.sidecar import load_sidecar_settings

OIDC = {
    "OIDC_TOKEN_URL": "https://idp.example/oauth/token",
    "OIDC_CLIENT_ID": "cp",
    "OIDC_CLIENT_SECRET": "s3cret",
}


def test_defaults_match_spec() -> None:
    s = load_settings(OIDC)
    assert (s.listen_host, s.listen_port) == ("0.0.0.0", 8080)
    assert (s.metrics_host, s.metrics_port) == ("0.0.0.0", 9090)
    assert s.authn == "tokenreview"
    assert s.minter == "oidc"
    assert s.audiences == ("ambient-cp",)
    assert s.allowed_sa == "system:serviceaccount:*:session-*-sa"
    assert s.allowed_namespaces == ("*",)
    assert s.managed_label == ("ambient-code.io/managed-by", "ambient-control-plane")
    assert s.namespace_label == ("ambient-code.io/managed", "true")
    assert s.require_bound is True
    assert (s.review_cache_ttl, s.max_reviews, s.min_ttl, s.ttl) == (30, 64, 300, 900)
    assert (s.rate, s.burst) == (5.0, 20)
    assert s.token_audience == "ambient-api-server"
    assert (s.log_level, s.log_format) == ("info", "json")
    assert s.liveness_cache_ttl == 10


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"CP_TOKEN_MINTER": "bogus"}, "CP_TOKEN_MINTER"),
        ({"CP_TOKEN_AUTHN": "ldap"}, "CP_TOKEN_AUTHN"),
        ({"CP_TOKEN_MINTER": "oidc"}, "OIDC_TOKEN_URL"),
        ({**OIDC, "OIDC_TOKEN_URL": "ftp://idp/token"}, "OIDC_TOKEN_URL"),
        ({**OIDC, "OIDC_TOKEN_URL": "https://user:pw@idp/token"}, "OIDC_TOKEN_URL"),
        ({**OIDC, "OIDC_CLIENT_ID": ""}, "OIDC_CLIENT_ID"),
        ({**OIDC, "OIDC_CLIENT_SECRET": ""}, "OIDC_CLIENT_SECRET"),
        ({**OIDC, "OIDC_CLIENT_SECRET_FILE": "/nonexistent/secret"}, "OIDC_CLIENT_SECRET_FILE"),
        (
            {"CP_TOKEN_MINTER": "jwt", "CP_TOKEN_SIGNING_KEY_FILE": "/nonexistent/key.pem"},
            "CP_TOKEN_SIGNING_KEY_FILE",
        ),
        ({"CP_TOKEN_MINTER": "jwt"}, "CP_TOKEN_ISSUER"),
        ({**OIDC, "CP_TOKEN_URL": "not a url"}, "CP_TOKEN_URL"),
        ({**OIDC, "CP_TOKEN_AUDIENCES": " , "}, "CP_TOKEN_AUDIENCES"),
        ({**OIDC, "CP_TOKEN_TTL": "300"}, "CP_TOKEN_TTL"),
        ({**OIDC, "CP_TOKEN_TTL": "abc"}, "CP_TOKEN_TTL"),
        ({**OIDC, "CP_TOKEN_TTL": "1e17"}, "CP_TOKEN_TTL"),  # past year 9999: never starts
        ({**OIDC, "CP_TOKEN_REVIEW_CACHE_TTL": "1e300"}, "CP_TOKEN_REVIEW_CACHE_TTL"),
        ({**OIDC, "CP_TOKEN_LISTEN_ADDR": "8080"}, "CP_TOKEN_LISTEN_ADDR"),
        ({**OIDC, "CP_TOKEN_LISTEN_ADDR": ":99999"}, "CP_TOKEN_LISTEN_ADDR"),
        ({**OIDC, "CP_TOKEN_RATE_LIMIT": "fast"}, "CP_TOKEN_RATE_LIMIT"),
        ({**OIDC, "CP_TOKEN_REQUIRE_BOUND": "maybe"}, "CP_TOKEN_REQUIRE_BOUND"),
        ({**OIDC, "CP_TOKEN_MANAGED_LABEL": "novalue"}, "CP_TOKEN_MANAGED_LABEL"),
        ({**OIDC, "CP_TOKEN_MAX_REVIEWS": "0"}, "CP_TOKEN_MAX_REVIEWS"),
        ({**OIDC, "CP_TOKEN_TLS_CERT_FILE": "/x.pem"}, "CP_TOKEN_TLS_KEY_FILE"),
        ({"CP_TOKEN_AUTHN": "static", **OIDC}, "CP_TOKEN_STATIC_IDENTITIES_FILE"),
        ({"CP_TOKEN_MINTER": "static"}, "CP_TOKEN_STATIC_TOKEN"),
        ({**OIDC, "CP_TOKEN_LOG_FORMAT": "xml"}, "CP_TOKEN_LOG_FORMAT"),
    ],
)
def test_errors_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert info.value.variable == variable
    assert str(info.value).startswith(f"{variable}: ")
    assert "\n" not in str(info.value)


def test_static_authn_allows_empty_audiences(tmp_path) -> None:
    ids = tmp_path / "ids.json"
    ids.write_text('{"identities": []}')
    s = load_settings(
        {
            "CP_TOKEN_AUTHN": "static",
            "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ids),
            "CP_TOKEN_AUDIENCES": "",
            "CP_TOKEN_MINTER": "static",
            "CP_TOKEN_STATIC_TOKEN": "x",
        }
    )
    assert s.audiences == ()


def test_empty_label_disables_check() -> None:
    s = load_settings({**OIDC, "CP_TOKEN_MANAGED_LABEL": "", "CP_TOKEN_NAMESPACE_LABEL": ""})
    assert s.managed_label is None and s.namespace_label is None


def test_issuer_defaults_from_url() -> None:
    s = load_settings({"CP_TOKEN_MINTER": "jwt", "CP_TOKEN_URL": "http://cp.ns.svc:8080/token"})
    assert s.issuer == "http://cp.ns.svc:8080"
    assert issuer_from_url("https://cp/a/token?x=1") == "https://cp/a"


def test_overrides_win_over_env() -> None:
    s = load_settings({**OIDC, "CP_TOKEN_LISTEN_ADDR": ":1"}, {"CP_TOKEN_LISTEN_ADDR": ":2"})
    assert s.listen_port == 2


def test_parse_addr_forms() -> None:
    assert parse_addr("X", ":8080") == ("0.0.0.0", 8080)
    assert parse_addr("X", "127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_addr("X", "[::1]:80") == ("::1", 80)


def test_redacted_hides_secrets() -> None:
    s = load_settings({**OIDC, "CP_TOKEN_STATIC_TOKEN": "tok-xyz"})
    shown = repr(redacted(s))
    assert "s3cret" not in shown and "tok-xyz" not in shown
    assert "<redacted>" in shown


def test_sidecar_requires_loopback() -> None:
    base = {"AMBIENT_CP_TOKEN_URL": "https://cp:8080/token"}
    assert load_sidecar_settings(base).listen_host == "127.0.0.1"
    with pytest.raises(ConfigError) as info:
        load_sidecar_settings({**base, "SIDECAR_LISTEN_ADDR": "0.0.0.0:8099"})
    assert info.value.variable == "SIDECAR_LISTEN_ADDR"
    s = load_sidecar_settings(
        {**base, "SIDECAR_LISTEN_ADDR": "0.0.0.0:8099", "SIDECAR_ALLOW_NON_LOOPBACK": "true"}
    )
    assert s.listen_host == "0.0.0.0"
    with pytest.raises(ConfigError) as info:
        load_sidecar_settings({})
    assert info.value.variable == "AMBIENT_CP_TOKEN_URL"
    with pytest.raises(ConfigError) as info:
        load_sidecar_settings({"AMBIENT_CP_TOKEN_URL": "http://u:p@cp/token"})
    assert info.value.variable == "AMBIENT_CP_TOKEN_URL"


ROOT = Path(__file__).resolve().parents[3]


PLAIN = "http://cp-token.ambient-code.svc:8080/token"


STATIC = {
    "CP_TOKEN_AUTHN": "static",
    "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ROOT / "examples" / "config" / "dev-identities.json"),
    "CP_TOKEN_MINTER": "static",
    "CP_TOKEN_STATIC_TOKEN": "t",
}


def test_with_tls_the_advertised_url_says_https(tmp_path: Path) -> None:
    leaf = trustme.CA().issue_cert("cp-token.ambient-code.svc")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    tls = {"CP_TOKEN_TLS_CERT_FILE": str(cert), "CP_TOKEN_TLS_KEY_FILE": str(key)}
    with pytest.raises(ConfigError) as info:
        load_settings({**STATIC, **tls, "CP_TOKEN_URL": PLAIN})
    assert info.value.variable == "CP_TOKEN_URL"
    https = "https://cp-token.ambient-code.svc:8080/token"
    jwt = {**STATIC, **tls, "CP_TOKEN_MINTER": "jwt", "CP_TOKEN_URL": https}
    assert load_settings(jwt).issuer == "https://cp-token.ambient-code.svc:8080"
