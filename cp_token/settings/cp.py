"""The CP token service's configuration (``cp-token serve``): env -> :class:`Settings`.

:func:`load_settings` reads one section at a time (serving, authentication, policy, minting,
limits, TLS, runtime), each a small function that validates what it reads. Each default is
written once: in :class:`Settings`, whence the loader reads it (``Settings.min_ttl``), or, for
the few other modules use too (the policy, the injector), as a constant here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cp_token.runtime.errors import ConfigError

from .common import (
    ALL_INTERFACES,
    CP_AUDIENCE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    LOG_FORMAT,
    LOG_LEVEL,
    Env,
    check_readable,
    parse_list,
    parse_url,
)

__all__ = [
    "ALLOWED_SA",
    "AUTHN_MODES",
    "METRICS_PORT",
    "MINTERS",
    "TOKEN_AUDIENCE",
    "Settings",
    "issuer_from_url",
    "load_settings",
    "parse_label",
    "parse_rate",
    "parse_scopes",
]

AUTHN_MODES = ("tokenreview", "jwks", "static")
MINTERS = ("oidc", "jwt", "static")

# Defaults other modules use too (the rest are written in Settings below).
METRICS_PORT = 9090
ALLOWED_SA = "system:serviceaccount:*:session-*-sa"
TOKEN_AUDIENCE = "ambient-api-server"

# A section's fields, by name, for Settings(**...): each section validates what it returns.
Fields = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    """Validated configuration of the CP token service (``cp-token serve``)."""

    listen_host: str = ALL_INTERFACES
    listen_port: int = 8080
    url: str | None = None
    authn: str = "tokenreview"
    sa_issuers: tuple[str, ...] = ()
    liveness_cache_ttl: float = 10.0
    audiences: tuple[str, ...] = (CP_AUDIENCE,)
    static_identities_file: str | None = None
    allowed_sa: str = ALLOWED_SA
    allowed_namespaces: tuple[str, ...] = ("*",)
    managed_label: tuple[str, str] | None = ("ambient-code.io/managed-by", "ambient-control-plane")
    namespace_label: tuple[str, str] | None = ("ambient-code.io/managed", "true")
    require_bound: bool = True
    review_cache_ttl: float = 30.0
    max_reviews: int = 64
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    minter: str = "oidc"
    oidc_token_url: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = None
    oidc_client_secret_file: str | None = None
    oidc_scope: str | None = None
    oidc_audience: str | None = None
    min_ttl: float = 300.0
    signing_key_file: str | None = None
    issuer: str | None = None
    token_audience: str = TOKEN_AUDIENCE
    ttl: float = 900.0
    exchange_audiences: tuple[str, ...] = (TOKEN_AUDIENCE,)
    exchange_scopes: tuple[str, ...] = ()
    static_token: str | None = None
    static_token_file: str | None = None
    rate: float = 5.0
    burst: int = 20
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    metrics_host: str = ALL_INTERFACES
    metrics_port: int = METRICS_PORT
    log_level: str = LOG_LEVEL
    log_format: str = LOG_FORMAT
    kubeconfig: str | None = None
    in_cluster: bool = False

    @property
    def tls(self) -> bool:
        """True when the service serves HTTPS."""
        return self.tls_cert_file is not None


def load_settings(
    env: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
) -> Settings:
    """Read and validate the CP service's configuration; raises :class:`ConfigError`.

    ``overrides`` (command-line flags, by variable name) take precedence over ``env``
    (default: ``os.environ``).
    """
    e = Env(env, overrides)
    serving = _serving(e)
    tls = _tls(e)
    url = e.url("CP_TOKEN_URL")
    if url is not None and tls["tls_cert_file"] and url.lower().startswith("http://"):
        # SPEC "Transport security": with TLS on, what is advertised says https.
        raise ConfigError(
            "CP_TOKEN_URL",
            "is http:// but the CP serves HTTPS (CP_TOKEN_TLS_CERT_FILE): advertise https://",
        )
    authn = e.choice("CP_TOKEN_AUTHN", Settings.authn, AUTHN_MODES)
    minter = e.choice("CP_TOKEN_MINTER", Settings.minter, MINTERS)
    return Settings(
        url=url,
        authn=authn,
        minter=minter,
        **serving,
        **_authentication(e, authn),
        **_policy(e),
        **_minting(e, minter, url),
        **_limits(e),
        **tls,
        **_runtime(e),
    )


# --- parsers of this component's values ------------------------------------------------------


def parse_label(
    name: str, value: str | None, default: tuple[str, str] | None
) -> tuple[str, str] | None:
    """Parse ``key=value``; an explicitly empty value disables the check (None)."""
    if value is None:
        return default
    raw = value.strip()
    if not raw:
        return None
    key, sep, val = raw.partition("=")
    if not sep or not key.strip():
        raise ConfigError(name, f"{raw!r} is not key=value (empty disables the check)")
    return key.strip(), val.strip()


_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3


def parse_scopes(name: str, value: str | None) -> tuple[str, ...]:
    """A comma list of RFC 6749 scope tokens (no spaces, quotes or backslashes)."""
    scopes = parse_list(value, "")
    for scope in scopes:
        if not _SCOPE_TOKEN.fullmatch(scope):
            raise ConfigError(name, f"{scope!r} is not an OAuth scope token (RFC 6749 §3.3)")
    return scopes


_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*s\s*(?:,\s*(\d+)\s*)?")


def parse_rate(name: str, value: str | None) -> tuple[float, int]:
    """Parse ``<rate>/s,<burst>`` (e.g. ``5/s,20``); unset: the defaults."""
    if not value:
        return Settings.rate, Settings.burst
    m = _RATE.fullmatch(value)
    if not m:
        raise ConfigError(name, f"{value!r} is not '<rate>/s,<burst>' (e.g. '5/s,20')")
    rate = float(m.group(1))
    burst = int(m.group(2)) if m.group(2) else max(1, int(rate))
    if rate <= 0 or burst < 1:
        raise ConfigError(name, "rate must be > 0 and burst >= 1")
    return rate, burst


def issuer_from_url(url: str) -> str:
    """Default JWT issuer: the CP URL without its ``/token`` path, query or fragment."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if path.endswith("/token"):
        path = path[: -len("/token")]
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


# --- sections ----------------------------------------------------------------------------------


def _serving(e: Env) -> Fields:
    listen_host, listen_port = e.addr("CP_TOKEN_LISTEN_ADDR", f":{Settings.listen_port}")
    metrics_host, metrics_port = e.addr("CP_TOKEN_METRICS_ADDR", f":{Settings.metrics_port}")
    return {
        "listen_host": listen_host,
        "listen_port": listen_port,
        "metrics_host": metrics_host,
        "metrics_port": metrics_port,
    }


def _authentication(e: Env, authn: str) -> Fields:
    audiences = e.items("CP_TOKEN_AUDIENCES", Settings.audiences)
    if not audiences and authn != "static":
        raise ConfigError(
            "CP_TOKEN_AUDIENCES", "must not be empty (the audience pods project their token for)"
        )
    identities = e.get("CP_TOKEN_STATIC_IDENTITIES_FILE")
    if authn == "static":
        name = "CP_TOKEN_STATIC_IDENTITIES_FILE"
        check_readable(name, e.required(name, "required when CP_TOKEN_AUTHN=static"))
    return {
        "audiences": audiences,
        "sa_issuers": e.items("CP_TOKEN_SA_ISSUER", ()),
        "static_identities_file": identities,
        "liveness_cache_ttl": e.number("CP_TOKEN_LIVENESS_CACHE_TTL", Settings.liveness_cache_ttl),
        "review_cache_ttl": e.number("CP_TOKEN_REVIEW_CACHE_TTL", Settings.review_cache_ttl),
        "max_reviews": e.count("CP_TOKEN_MAX_REVIEWS", Settings.max_reviews),
    }


def _policy(e: Env) -> Fields:
    namespaces = e.items("CP_TOKEN_ALLOWED_NAMESPACES", Settings.allowed_namespaces)
    if not namespaces:
        raise ConfigError("CP_TOKEN_ALLOWED_NAMESPACES", "must not be empty (use '*' for any)")
    managed, namespace = "CP_TOKEN_MANAGED_LABEL", "CP_TOKEN_NAMESPACE_LABEL"
    return {
        "allowed_sa": e.get("CP_TOKEN_ALLOWED_SA") or Settings.allowed_sa,
        "allowed_namespaces": namespaces,
        "managed_label": parse_label(managed, e.raw(managed), Settings.managed_label),
        "namespace_label": parse_label(namespace, e.raw(namespace), Settings.namespace_label),
        "require_bound": e.flag("CP_TOKEN_REQUIRE_BOUND", Settings.require_bound),
    }


def _minting(e: Env, minter: str, url: str | None) -> Fields:
    return {
        **_oidc(e, minter),
        **_jwt(e, minter, url),
        **_static_token(e, minter),
        **_lifetimes(e),
        **_exchange(e),
    }


def _secret(e: Env, minter: str, name: str, file_name: str) -> None:
    """The minter's secret is set, inline (``name``) or as a readable file (``file_name``)."""
    if e.get(name) is None and e.get(file_name) is None:
        raise ConfigError(name, f"required when CP_TOKEN_MINTER={minter} (or set {file_name})")
    e.file(file_name)


def _oidc(e: Env, minter: str) -> Fields:
    if minter == "oidc":
        why = "required when CP_TOKEN_MINTER=oidc"
        parse_url("OIDC_TOKEN_URL", e.required("OIDC_TOKEN_URL", why))
        e.required("OIDC_CLIENT_ID", why)
        _secret(e, minter, "OIDC_CLIENT_SECRET", "OIDC_CLIENT_SECRET_FILE")
    return {
        "oidc_token_url": e.get("OIDC_TOKEN_URL"),
        "oidc_client_id": e.get("OIDC_CLIENT_ID"),
        "oidc_client_secret": e.get("OIDC_CLIENT_SECRET"),
        "oidc_client_secret_file": e.get("OIDC_CLIENT_SECRET_FILE"),
        "oidc_scope": e.get("OIDC_SCOPE"),
        "oidc_audience": e.get("OIDC_AUDIENCE"),
    }


def _jwt(e: Env, minter: str, url: str | None) -> Fields:
    issuer = e.url("CP_TOKEN_ISSUER")
    if minter == "jwt":
        e.file("CP_TOKEN_SIGNING_KEY_FILE")
        if issuer is None:
            if url is None:
                raise ConfigError(
                    "CP_TOKEN_ISSUER",
                    "required with CP_TOKEN_MINTER=jwt when CP_TOKEN_URL is unset",
                )
            issuer = issuer_from_url(url)
    return {"signing_key_file": e.get("CP_TOKEN_SIGNING_KEY_FILE"), "issuer": issuer}


def _static_token(e: Env, minter: str) -> Fields:
    if minter == "static":
        _secret(e, minter, "CP_TOKEN_STATIC_TOKEN", "CP_TOKEN_STATIC_TOKEN_FILE")
    return {
        "static_token": e.get("CP_TOKEN_STATIC_TOKEN"),
        "static_token_file": e.get("CP_TOKEN_STATIC_TOKEN_FILE"),
    }


def _lifetimes(e: Env) -> Fields:
    min_ttl = e.number("CP_TOKEN_MIN_TTL", Settings.min_ttl)
    ttl = e.number("CP_TOKEN_TTL", Settings.ttl, minimum=1)
    if ttl <= min_ttl:
        raise ConfigError("CP_TOKEN_TTL", f"must exceed CP_TOKEN_MIN_TTL ({ttl:g} <= {min_ttl:g})")
    return {"min_ttl": min_ttl, "ttl": ttl}


def _exchange(e: Env) -> Fields:
    token_audience = e.get("CP_TOKEN_TOKEN_AUDIENCE") or Settings.token_audience
    scopes = "CP_TOKEN_EXCHANGE_SCOPES"
    return {
        "token_audience": token_audience,
        "exchange_audiences": e.items("CP_TOKEN_EXCHANGE_AUDIENCES", (token_audience,)),
        "exchange_scopes": parse_scopes(scopes, e.raw(scopes)),
    }


def _limits(e: Env) -> Fields:
    rate, burst = parse_rate("CP_TOKEN_RATE_LIMIT", e.get("CP_TOKEN_RATE_LIMIT"))
    return {
        "rate": rate,
        "burst": burst,
        "max_connections": e.count("CP_TOKEN_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS),
        "max_connections_per_client": max_per_client(e),
    }


def max_per_client(e: Env) -> int:
    """``CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT``: a whole number, 0 (no per-address cap, for a
    proxy or mesh that hides source addresses) or more; the CP and the injector read it."""
    return e.count(
        "CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT", DEFAULT_MAX_CONNECTIONS_PER_CLIENT, minimum=0
    )


def _tls(e: Env) -> Fields:
    cert, key = e.get("CP_TOKEN_TLS_CERT_FILE"), e.get("CP_TOKEN_TLS_KEY_FILE")
    if (cert is None) != (key is None):
        missing = "CP_TOKEN_TLS_KEY_FILE" if key is None else "CP_TOKEN_TLS_CERT_FILE"
        raise ConfigError(missing, "set both CP_TOKEN_TLS_CERT_FILE and CP_TOKEN_TLS_KEY_FILE")
    return {
        "tls_cert_file": e.file("CP_TOKEN_TLS_CERT_FILE"),
        "tls_key_file": e.file("CP_TOKEN_TLS_KEY_FILE"),
    }


def _runtime(e: Env) -> Fields:
    kubeconfig = e.get("KUBECONFIG")
    return {
        "kubeconfig": kubeconfig,
        "in_cluster": e.get("KUBERNETES_SERVICE_HOST") is not None and kubeconfig is None,
        **e.logging("CP_TOKEN_LOG_LEVEL", "CP_TOKEN_LOG_FORMAT"),
    }
