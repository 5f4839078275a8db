"""The only reader of the environment: env -> frozen, validated settings.

Every component (CP service, sidecar, client library) gets its settings from a loader here
that takes the environment as a mapping, so tests pass a dict and only entry points pass
``os.environ``. A mistake raises :class:`ConfigError`, which the command-line entry points
turn into exit code 2 and one line naming the variable.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "ClientSettings",
    "ConfigError",
    "Settings",
    "SidecarSettings",
    "load_client_settings",
    "load_settings",
    "load_sidecar_settings",
    "redacted",
]

AUTHN_MODES = ("tokenreview", "jwks", "static")
MINTERS = ("oidc", "jwt", "static")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")


class ConfigError(Exception):
    """A configuration mistake: names the variable and the problem in one line."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


# --- parsing helpers -------------------------------------------------------------------


def _get(env: Mapping[str, str], name: str) -> str | None:
    """A variable's value, stripped; unset and empty are both None."""
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


_ADDR = re.compile(r"(?:\[(?P<v6>[0-9a-fA-F:.%]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})")


def parse_addr(name: str, value: str) -> tuple[str, int]:
    """Parse ``host:port`` (``:8080`` = all interfaces, ``[::1]:80`` for IPv6)."""
    m = _ADDR.fullmatch(value)
    if not m:
        raise ConfigError(name, f"{value!r} is not host:port (e.g. ':8080' or '127.0.0.1:8099')")
    port = int(m.group("port"))
    if not 0 <= port <= 65535:
        raise ConfigError(name, f"port {port} is out of range")
    host = m.group("v6") or m.group("host") or "0.0.0.0"
    return host, port


def is_loopback_host(host: str) -> bool:
    """True for loopback IPs and the name ``localhost``."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_url(name: str, value: str) -> str:
    """Validate an http(s) URL with a host and no user-info; returns it unchanged."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(name, f"malformed URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(name, "must be an http:// or https:// URL")
    if not parts.hostname:
        raise ConfigError(name, "URL has no host")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ConfigError(name, "URL must not carry user-info (credentials)")
    if port is not None and not 0 < port <= 65535:
        raise ConfigError(name, "URL port is out of range")
    if any(c.isspace() for c in value):
        raise ConfigError(name, "URL contains whitespace")
    return value


def parse_bool(name: str, value: str | None, default: bool) -> bool:
    """Parse true/false (also 1/0, yes/no, on/off)."""
    if value is None:
        return default
    v = value.lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise ConfigError(name, f"{value!r} is not a boolean (true or false)")


def parse_number(
    name: str, value: str | None, default: float, *, minimum: float = 0.0, integer: bool = False
) -> float:
    """Parse a non-negative number of seconds (or a count when ``integer``)."""
    if value is None:
        return default
    try:
        number = float(int(value)) if integer else float(value)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ConfigError(name, f"{value!r} is not {kind}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(name, f"{value!r} is not a finite number")
    if number < minimum:
        raise ConfigError(name, f"must be at least {minimum:g}, got {value}")
    return number


def parse_label(name: str, value: str | None, default: str) -> tuple[str, str] | None:
    """Parse ``key=value``; an explicitly empty value disables the check (None)."""
    raw = default if value is None else value.strip()
    if not raw:
        return None
    key, sep, val = raw.partition("=")
    if not sep or not key.strip():
        raise ConfigError(name, f"{raw!r} is not key=value (empty disables the check)")
    return key.strip(), val.strip()


def parse_list(value: str | None, default: str) -> tuple[str, ...]:
    """Parse a comma list, dropping blanks."""
    raw = default if value is None else value
    return tuple(item.strip() for item in raw.split(",") if item.strip())


_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3


def parse_scopes(name: str, value: str | None) -> tuple[str, ...]:
    """A comma list of RFC 6749 scope tokens (no spaces, quotes or backslashes)."""
    scopes = parse_list(value, "")
    for scope in scopes:
        if not _SCOPE_TOKEN.fullmatch(scope):
            raise ConfigError(name, f"{scope!r} is not an OAuth scope token (RFC 6749 §3.3)")
    return scopes


def check_readable(name: str, path: str) -> str:
    """Fail at start if a configured file cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ConfigError(name, f"cannot read {path!r} ({exc.strerror or exc})") from None
    return path


def parse_rate(name: str, value: str | None) -> tuple[float, int]:
    """Parse ``<rate>/s,<burst>`` (e.g. ``5/s,20``)."""
    raw = value or "5/s,20"
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*/\s*s\s*(?:,\s*(\d+)\s*)?", raw)
    if not m:
        raise ConfigError(name, f"{raw!r} is not '<rate>/s,<burst>' (e.g. '5/s,20')")
    rate = float(m.group(1))
    burst = int(m.group(2)) if m.group(2) else max(1, int(rate))
    if rate <= 0 or burst < 1:
        raise ConfigError(name, "rate must be > 0 and burst >= 1")
    return rate, burst


def parse_mode(name: str, value: str | None, default: int) -> int:
    """Parse an octal file mode such as ``0600``."""
    if value is None:
        return default
    try:
        mode = int(value, 8)
    except ValueError:
        raise ConfigError(name, f"{value!r} is not an octal file mode (e.g. 0600)") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(name, f"{value!r} is not a file mode between 0000 and 0777")
    return mode


def _choice(name: str, value: str | None, default: str, choices: tuple[str, ...]) -> str:
    chosen = (value or default).lower()
    if chosen not in choices:
        raise ConfigError(name, f"unknown value {value!r} (expected one of: {', '.join(choices)})")
    return chosen


def issuer_from_url(url: str) -> str:
    """Default JWT issuer: the CP URL without its ``/token`` path, query or fragment."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    if path.endswith("/token"):
        path = path[: -len("/token")]
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


# --- CP token service --------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Validated configuration of the CP token service (``cp-token serve``)."""

    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    url: str | None = None
    authn: str = "tokenreview"
    sa_issuers: tuple[str, ...] = ()
    liveness_cache_ttl: float = 10.0
    audiences: tuple[str, ...] = ("ambient-cp",)
    static_identities_file: str | None = None
    allowed_sa: str = "system:serviceaccount:*:session-*-sa"
    allowed_namespaces: tuple[str, ...] = ("*",)
    managed_label: tuple[str, str] | None = ("ambient-code.io/managed-by", "ambient-control-plane")
    namespace_label: tuple[str, str] | None = ("ambient-code.io/managed", "true")
    require_bound: bool = True
    review_cache_ttl: float = 30.0
    max_reviews: int = 64
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
    token_audience: str = "ambient-api-server"
    ttl: float = 900.0
    exchange_audiences: tuple[str, ...] = ("ambient-api-server",)
    exchange_scopes: tuple[str, ...] = ()
    static_token: str | None = None
    static_token_file: str | None = None
    rate: float = 5.0
    burst: int = 20
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9090
    log_level: str = "info"
    log_format: str = "json"
    kubeconfig: str | None = None
    in_cluster: bool = False

    @property
    def tls(self) -> bool:
        """True when the service serves HTTPS."""
        return self.tls_cert_file is not None


SECRET_FIELDS = frozenset({"oidc_client_secret", "static_token"})


def redacted(settings: Any) -> dict[str, Any]:
    """The settings as a dict with secrets replaced, for the start-up log line."""
    out: dict[str, Any] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name in SECRET_FIELDS or f.name == "bot_token":
            value = "<redacted>" if value else None
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def load_settings(
    env: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
) -> Settings:
    """Read and validate the CP service's configuration; raises :class:`ConfigError`.

    ``overrides`` (command-line flags, by variable name) take precedence over ``env``.
    """
    env = os.environ if env is None else env
    if overrides:
        env = {**env, **overrides}
    g = functools.partial(_get, env)

    host, port = parse_addr("CP_TOKEN_LISTEN_ADDR", g("CP_TOKEN_LISTEN_ADDR") or ":8080")
    m_host, m_port = parse_addr("CP_TOKEN_METRICS_ADDR", g("CP_TOKEN_METRICS_ADDR") or ":9090")
    url = g("CP_TOKEN_URL")
    if url is not None:
        parse_url("CP_TOKEN_URL", url)

    authn = _choice("CP_TOKEN_AUTHN", g("CP_TOKEN_AUTHN"), "tokenreview", AUTHN_MODES)
    minter = _choice("CP_TOKEN_MINTER", g("CP_TOKEN_MINTER"), "oidc", MINTERS)

    audiences = parse_list(env.get("CP_TOKEN_AUDIENCES"), "ambient-cp")
    if not audiences and authn != "static":
        raise ConfigError(
            "CP_TOKEN_AUDIENCES", "must not be empty (the audience pods project their token for)"
        )

    sa_issuers = parse_list(env.get("CP_TOKEN_SA_ISSUER"), "")
    identities = g("CP_TOKEN_STATIC_IDENTITIES_FILE")
    if authn == "static":
        if identities is None:
            raise ConfigError(
                "CP_TOKEN_STATIC_IDENTITIES_FILE", "required when CP_TOKEN_AUTHN=static"
            )
        check_readable("CP_TOKEN_STATIC_IDENTITIES_FILE", identities)

    allowed_ns = parse_list(env.get("CP_TOKEN_ALLOWED_NAMESPACES"), "*")
    if not allowed_ns:
        raise ConfigError("CP_TOKEN_ALLOWED_NAMESPACES", "must not be empty (use '*' for any)")

    oidc_url = g("OIDC_TOKEN_URL")
    client_id = g("OIDC_CLIENT_ID")
    client_secret = g("OIDC_CLIENT_SECRET")
    client_secret_file = g("OIDC_CLIENT_SECRET_FILE")
    if minter == "oidc":
        if oidc_url is None:
            raise ConfigError("OIDC_TOKEN_URL", "required when CP_TOKEN_MINTER=oidc")
        parse_url("OIDC_TOKEN_URL", oidc_url)
        if client_id is None:
            raise ConfigError("OIDC_CLIENT_ID", "required when CP_TOKEN_MINTER=oidc")
        if client_secret is None and client_secret_file is None:
            raise ConfigError(
                "OIDC_CLIENT_SECRET",
                "required when CP_TOKEN_MINTER=oidc (or set OIDC_CLIENT_SECRET_FILE)",
            )
        if client_secret_file is not None:
            check_readable("OIDC_CLIENT_SECRET_FILE", client_secret_file)

    key_file = g("CP_TOKEN_SIGNING_KEY_FILE")
    issuer = g("CP_TOKEN_ISSUER")
    if issuer is not None:
        parse_url("CP_TOKEN_ISSUER", issuer)
    if minter == "jwt":
        if key_file is not None:
            check_readable("CP_TOKEN_SIGNING_KEY_FILE", key_file)
        if issuer is None:
            if url is None:
                raise ConfigError(
                    "CP_TOKEN_ISSUER",
                    "required with CP_TOKEN_MINTER=jwt when CP_TOKEN_URL is unset",
                )
            issuer = issuer_from_url(url)

    static_token = g("CP_TOKEN_STATIC_TOKEN")
    static_token_file = g("CP_TOKEN_STATIC_TOKEN_FILE")
    if minter == "static":
        if static_token is None and static_token_file is None:
            raise ConfigError(
                "CP_TOKEN_STATIC_TOKEN",
                "required when CP_TOKEN_MINTER=static (or set CP_TOKEN_STATIC_TOKEN_FILE)",
            )
        if static_token_file is not None:
            check_readable("CP_TOKEN_STATIC_TOKEN_FILE", static_token_file)

    min_ttl = parse_number("CP_TOKEN_MIN_TTL", g("CP_TOKEN_MIN_TTL"), 300.0)
    ttl = parse_number("CP_TOKEN_TTL", g("CP_TOKEN_TTL"), 900.0, minimum=1)
    if ttl <= min_ttl:
        raise ConfigError("CP_TOKEN_TTL", f"must exceed CP_TOKEN_MIN_TTL ({ttl:g} <= {min_ttl:g})")

    rate, burst = parse_rate("CP_TOKEN_RATE_LIMIT", g("CP_TOKEN_RATE_LIMIT"))

    token_audience = g("CP_TOKEN_TOKEN_AUDIENCE") or "ambient-api-server"
    exchange_audiences = parse_list(env.get("CP_TOKEN_EXCHANGE_AUDIENCES"), token_audience)
    exchange_scopes = parse_scopes("CP_TOKEN_EXCHANGE_SCOPES", env.get("CP_TOKEN_EXCHANGE_SCOPES"))

    cert = g("CP_TOKEN_TLS_CERT_FILE")
    key = g("CP_TOKEN_TLS_KEY_FILE")
    if (cert is None) != (key is None):
        missing = "CP_TOKEN_TLS_KEY_FILE" if key is None else "CP_TOKEN_TLS_CERT_FILE"
        raise ConfigError(missing, "set both CP_TOKEN_TLS_CERT_FILE and CP_TOKEN_TLS_KEY_FILE")
    if cert is not None and key is not None:
        check_readable("CP_TOKEN_TLS_CERT_FILE", cert)
        check_readable("CP_TOKEN_TLS_KEY_FILE", key)

    kubeconfig = g("KUBECONFIG")
    in_cluster = g("KUBERNETES_SERVICE_HOST") is not None and kubeconfig is None

    return Settings(
        listen_host=host,
        listen_port=port,
        url=url,
        authn=authn,
        sa_issuers=sa_issuers,
        liveness_cache_ttl=parse_number(
            "CP_TOKEN_LIVENESS_CACHE_TTL", g("CP_TOKEN_LIVENESS_CACHE_TTL"), 10.0
        ),
        audiences=audiences,
        static_identities_file=identities,
        allowed_sa=g("CP_TOKEN_ALLOWED_SA") or "system:serviceaccount:*:session-*-sa",
        allowed_namespaces=allowed_ns,
        managed_label=parse_label(
            "CP_TOKEN_MANAGED_LABEL",
            env.get("CP_TOKEN_MANAGED_LABEL"),
            "ambient-code.io/managed-by=ambient-control-plane",
        ),
        namespace_label=parse_label(
            "CP_TOKEN_NAMESPACE_LABEL",
            env.get("CP_TOKEN_NAMESPACE_LABEL"),
            "ambient-code.io/managed=true",
        ),
        require_bound=parse_bool("CP_TOKEN_REQUIRE_BOUND", g("CP_TOKEN_REQUIRE_BOUND"), True),
        review_cache_ttl=parse_number(
            "CP_TOKEN_REVIEW_CACHE_TTL", g("CP_TOKEN_REVIEW_CACHE_TTL"), 30.0
        ),
        max_reviews=int(
            parse_number(
                "CP_TOKEN_MAX_REVIEWS", g("CP_TOKEN_MAX_REVIEWS"), 64, minimum=1, integer=True
            )
        ),
        minter=minter,
        oidc_token_url=oidc_url,
        oidc_client_id=client_id,
        oidc_client_secret=client_secret,
        oidc_client_secret_file=client_secret_file,
        oidc_scope=g("OIDC_SCOPE"),
        oidc_audience=g("OIDC_AUDIENCE"),
        min_ttl=min_ttl,
        signing_key_file=key_file,
        issuer=issuer,
        token_audience=token_audience,
        ttl=ttl,
        exchange_audiences=exchange_audiences,
        exchange_scopes=exchange_scopes,
        static_token=static_token,
        static_token_file=static_token_file,
        rate=rate,
        burst=burst,
        tls_cert_file=cert,
        tls_key_file=key,
        metrics_host=m_host,
        metrics_port=m_port,
        log_level=_choice("CP_TOKEN_LOG_LEVEL", g("CP_TOKEN_LOG_LEVEL"), "info", LOG_LEVELS),
        log_format=_choice("CP_TOKEN_LOG_FORMAT", g("CP_TOKEN_LOG_FORMAT"), "json", LOG_FORMATS),
        kubeconfig=kubeconfig,
        in_cluster=in_cluster,
    )


# --- client library ----------------------------------------------------------------------

DEFAULT_SA_TOKEN_FILE = "/var/run/secrets/tokens/ambient-cp"


@dataclass(frozen=True)
class ClientSettings:
    """Where the client library gets its token: the first source that is set decides."""

    sidecar_url: str | None = None
    cp_token_url: str | None = None
    bot_token: str | None = None
    sa_token_file: str = DEFAULT_SA_TOKEN_FILE
    ca_file: str | None = None
    timeout: float = 10.0

    @property
    def source(self) -> str:
        """``sidecar``, ``direct``, ``bot`` or ``none``."""
        if self.sidecar_url:
            return "sidecar"
        if self.cp_token_url:
            return "direct"
        if self.bot_token:
            return "bot"
        return "none"


def load_client_settings(env: Mapping[str, str] | None = None) -> ClientSettings:
    """Read the client library's variables; raises :class:`ConfigError`."""
    env = os.environ if env is None else env
    sidecar_url = _get(env, "AMBIENT_TOKEN_SIDECAR_URL")
    if sidecar_url is not None:
        parse_url("AMBIENT_TOKEN_SIDECAR_URL", sidecar_url)
    cp_url = _get(env, "AMBIENT_CP_TOKEN_URL")
    if cp_url is not None:
        parse_url("AMBIENT_CP_TOKEN_URL", cp_url)
    ca_file = _get(env, "AMBIENT_CP_CA_FILE")
    if ca_file is not None:
        check_readable("AMBIENT_CP_CA_FILE", ca_file)
    return ClientSettings(
        sidecar_url=sidecar_url,
        cp_token_url=cp_url,
        bot_token=_get(env, "BOT_TOKEN"),
        sa_token_file=_get(env, "AMBIENT_SA_TOKEN_FILE") or DEFAULT_SA_TOKEN_FILE,
        ca_file=ca_file,
        timeout=parse_number(
            "AMBIENT_CP_TOKEN_TIMEOUT_SECS",
            _get(env, "AMBIENT_CP_TOKEN_TIMEOUT_SECS"),
            10.0,
            minimum=0.001,
        ),
    )


# --- token sidecar -----------------------------------------------------------------------


@dataclass(frozen=True)
class SidecarSettings:
    """Validated configuration of the token sidecar (``cp-token-sidecar``)."""

    cp_token_url: str
    listen_host: str = "127.0.0.1"
    listen_port: int = 8099
    allow_non_loopback: bool = False
    sa_token_file: str = DEFAULT_SA_TOKEN_FILE
    token_file: str | None = None
    token_file_mode: int = 0o600
    min_ttl: float = 60.0
    refresh_fraction: float = 0.5
    ca_file: str | None = None
    timeout: float = 10.0
    metrics_host: str | None = None
    metrics_port: int | None = None
    log_level: str = "info"
    log_format: str = "json"


def load_sidecar_settings(env: Mapping[str, str] | None = None) -> SidecarSettings:
    """Read and validate the sidecar's configuration; raises :class:`ConfigError`."""
    env = os.environ if env is None else env
    g = functools.partial(_get, env)
    url = g("AMBIENT_CP_TOKEN_URL")
    if url is None:
        raise ConfigError("AMBIENT_CP_TOKEN_URL", "required: the CP token service's /token URL")
    parse_url("AMBIENT_CP_TOKEN_URL", url)
    host, port = parse_addr("SIDECAR_LISTEN_ADDR", g("SIDECAR_LISTEN_ADDR") or "127.0.0.1:8099")
    allow = parse_bool("SIDECAR_ALLOW_NON_LOOPBACK", g("SIDECAR_ALLOW_NON_LOOPBACK"), False)
    if not allow and not is_loopback_host(host):
        raise ConfigError(
            "SIDECAR_LISTEN_ADDR",
            f"{host!r} is not a loopback address (set SIDECAR_ALLOW_NON_LOOPBACK=true to allow)",
        )
    metrics_host: str | None = None
    metrics_port: int | None = None
    if g("SIDECAR_METRICS_ADDR") is not None:
        metrics_host, metrics_port = parse_addr(
            "SIDECAR_METRICS_ADDR", g("SIDECAR_METRICS_ADDR") or ""
        )
    fraction = parse_number(
        "SIDECAR_REFRESH_FRACTION", g("SIDECAR_REFRESH_FRACTION"), 0.5, minimum=0.01
    )
    if fraction >= 1:
        raise ConfigError("SIDECAR_REFRESH_FRACTION", "must be below 1 (e.g. 0.5 = half-life)")
    token_file = g("SIDECAR_TOKEN_FILE")
    if token_file is not None and not os.path.isdir(os.path.dirname(os.path.abspath(token_file))):
        raise ConfigError(
            "SIDECAR_TOKEN_FILE", f"directory of {token_file!r} does not exist (mount an emptyDir)"
        )
    ca_file = g("AMBIENT_CP_CA_FILE")
    if ca_file is not None:
        check_readable("AMBIENT_CP_CA_FILE", ca_file)
    return SidecarSettings(
        cp_token_url=url,
        listen_host=host,
        listen_port=port,
        allow_non_loopback=allow,
        sa_token_file=g("AMBIENT_SA_TOKEN_FILE") or DEFAULT_SA_TOKEN_FILE,
        token_file=token_file,
        token_file_mode=parse_mode("SIDECAR_TOKEN_FILE_MODE", g("SIDECAR_TOKEN_FILE_MODE"), 0o600),
        min_ttl=parse_number("SIDECAR_MIN_TTL", g("SIDECAR_MIN_TTL"), 60.0),
        refresh_fraction=fraction,
        ca_file=ca_file,
        timeout=parse_number(
            "AMBIENT_CP_TOKEN_TIMEOUT_SECS",
            g("AMBIENT_CP_TOKEN_TIMEOUT_SECS"),
            10.0,
            minimum=0.001,
        ),
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        log_level=_choice("SIDECAR_LOG_LEVEL", g("SIDECAR_LOG_LEVEL"), "info", LOG_LEVELS),
        log_format=_choice("SIDECAR_LOG_FORMAT", g("SIDECAR_LOG_FORMAT"), "json", LOG_FORMATS),
    )
