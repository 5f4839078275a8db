"""The token sidecar's configuration (``cp-token-sidecar``): env -> :class:`SidecarSettings`.

Standard library only and small: every session pod runs a sidecar, and what it imports is
resident memory in each.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cp_token.runtime.errors import ConfigError

from .client import DEFAULT_SA_TOKEN_FILE, TIMEOUT, upstream_fields
from .common import (
    ALLOW_PLAINTEXT,
    LOG_FORMAT,
    LOG_LEVEL,
    Env,
    is_loopback_host,
    parse_addr,
    parse_url,
    plaintext_refusal,
)

__all__ = [
    "ALLOW_PLAINTEXT",
    "GRPC_LISTEN_ADDR",
    "LISTEN_ADDR",
    "REFRESH_FRACTION",
    "UPSTREAM_PREFIX",
    "SidecarSettings",
    "Upstreams",
    "load_sidecar_settings",
    "parse_grpc_target",
    "parse_mode",
    "parse_upstreams",
]

# The defaults are written once, in SidecarSettings below (the loader reads them from there),
# but for this one, which the holder uses too.
REFRESH_FRACTION = 0.5
# The sidecar's HTTP egress routes: /upstream/<name>/<path>.
UPSTREAM_PREFIX = "/upstream/"
# (name, base URL without a trailing slash), in the order configured: the first is the one
# injected app containers get as AMBIENT_API_URL.
Upstreams = tuple[tuple[str, str], ...]
_UPSTREAM_NAME = re.compile(r"[a-z0-9-]+")


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
    refresh_fraction: float = REFRESH_FRACTION
    ca_file: str | None = None
    timeout: float = TIMEOUT
    metrics_host: str | None = None
    metrics_port: int | None = None
    log_level: str = LOG_LEVEL
    log_format: str = LOG_FORMAT
    # AMBIENT_CP_ALLOW_PLAINTEXT: an http:// AMBIENT_CP_TOKEN_URL to a non-loopback host
    allow_plaintext: bool = False
    # Sealed mode (SPEC "Sealed mode"): /token refused, no token file, the token added to the
    # pod's API calls instead. The upstreams are served whenever they are configured.
    sealed: bool = False
    upstreams: Upstreams = ()
    upstream_ca_file: str | None = None
    upstream_timeout: float = 30.0
    grpc_upstream: str | None = None
    grpc_listen_host: str = "127.0.0.1"
    grpc_listen_port: int = 8098


# The default addresses as one value each: what injected sidecars are configured with.
LISTEN_ADDR = f"{SidecarSettings.listen_host}:{SidecarSettings.listen_port}"
GRPC_LISTEN_ADDR = f"{SidecarSettings.grpc_listen_host}:{SidecarSettings.grpc_listen_port}"


def load_sidecar_settings(env: Mapping[str, str] | None = None) -> SidecarSettings:
    """Read and validate the sidecar's configuration (default: ``os.environ``); raises
    :class:`ConfigError`."""
    e = Env(env)
    url = e.required("AMBIENT_CP_TOKEN_URL", "required: the CP token service's /token URL")
    parse_url("AMBIENT_CP_TOKEN_URL", url)
    allow = e.flag(ALLOW_PLAINTEXT, SidecarSettings.allow_plaintext)
    refusal = plaintext_refusal("AMBIENT_CP_TOKEN_URL", url, allow)
    if refusal is not None:
        raise refusal
    sealed = _sealed(e)
    return SidecarSettings(
        cp_token_url=url,
        allow_plaintext=allow,
        **_listeners(e),
        **_token_file(e),
        **sealed,
        min_ttl=e.number("SIDECAR_MIN_TTL", SidecarSettings.min_ttl),
        refresh_fraction=_refresh_fraction(e),
        **upstream_fields(e),
        **e.logging("SIDECAR_LOG_LEVEL", "SIDECAR_LOG_FORMAT"),
    )


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


def _listeners(e: Env) -> dict[str, Any]:
    """The token port (loopback unless allowed otherwise) and the optional probe port."""
    host, port = e.addr("SIDECAR_LISTEN_ADDR", LISTEN_ADDR)
    allow = e.flag("SIDECAR_ALLOW_NON_LOOPBACK", False)
    if not allow and not is_loopback_host(host):
        raise ConfigError(
            "SIDECAR_LISTEN_ADDR",
            f"{host!r} is not a loopback address (set SIDECAR_ALLOW_NON_LOOPBACK=true to allow)",
        )
    metrics = e.get("SIDECAR_METRICS_ADDR")
    m_host, m_port = (
        (None, None) if metrics is None else parse_addr("SIDECAR_METRICS_ADDR", metrics)
    )
    return {
        "listen_host": host,
        "listen_port": port,
        "allow_non_loopback": allow,
        "metrics_host": m_host,
        "metrics_port": m_port,
    }


def _token_file(e: Env) -> dict[str, Any]:
    """Where to write the token (its directory must exist: an emptyDir) and with what mode."""
    path = e.get("SIDECAR_TOKEN_FILE")
    if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ConfigError(
            "SIDECAR_TOKEN_FILE", f"directory of {path!r} does not exist (mount an emptyDir)"
        )
    mode = "SIDECAR_TOKEN_FILE_MODE"
    return {
        "token_file": path,
        "token_file_mode": parse_mode(mode, e.get(mode), SidecarSettings.token_file_mode),
    }


def _refresh_fraction(e: Env) -> float:
    fraction = e.number("SIDECAR_REFRESH_FRACTION", REFRESH_FRACTION, minimum=0.01)
    if fraction >= 1:
        raise ConfigError("SIDECAR_REFRESH_FRACTION", "must be below 1 (e.g. 0.5 = half-life)")
    return fraction


# --- sealed mode -------------------------------------------------------------------------------


def _sealed(e: Env) -> dict[str, Any]:
    """``SIDECAR_SEALED`` and the upstreams: a sealed sidecar writes no token file and has
    somewhere to send the pod's API calls."""
    sealed = e.flag("SIDECAR_SEALED", SidecarSettings.sealed)
    allow_plaintext = e.flag(ALLOW_PLAINTEXT, False)
    upstreams = parse_upstreams("SIDECAR_UPSTREAMS", e.get("SIDECAR_UPSTREAMS"), allow_plaintext)
    grpc = e.get("SIDECAR_GRPC_UPSTREAM")
    grpc_upstream = None if grpc is None else parse_grpc_target("SIDECAR_GRPC_UPSTREAM", grpc)
    if sealed and e.get("SIDECAR_TOKEN_FILE") is not None:
        raise ConfigError(
            "SIDECAR_TOKEN_FILE",
            "must be unset with SIDECAR_SEALED=true (a sealed sidecar keeps the token to itself)",
        )
    if sealed and not upstreams and grpc_upstream is None:
        raise ConfigError(
            "SIDECAR_UPSTREAMS",
            "SIDECAR_SEALED=true needs SIDECAR_UPSTREAMS or SIDECAR_GRPC_UPSTREAM (where the "
            "pod's API calls go)",
        )
    host, port = e.addr("SIDECAR_GRPC_LISTEN_ADDR", GRPC_LISTEN_ADDR)
    if not e.flag("SIDECAR_ALLOW_NON_LOOPBACK", False) and not is_loopback_host(host):
        raise ConfigError(
            "SIDECAR_GRPC_LISTEN_ADDR",
            f"{host!r} is not a loopback address (plaintext gRPC for the pod's own containers)",
        )
    return {
        "sealed": sealed,
        "upstreams": upstreams,
        "upstream_ca_file": _ca_bundle(e, "SIDECAR_UPSTREAM_CA_FILE"),
        "upstream_timeout": e.number(
            "SIDECAR_UPSTREAM_TIMEOUT_SECS", SidecarSettings.upstream_timeout, minimum=0.001
        ),
        "grpc_upstream": grpc_upstream,
        "grpc_listen_host": host,
        "grpc_listen_port": port,
    }


def parse_upstreams(name: str, value: str | None, allow_plaintext: bool) -> Upstreams:
    """``name=https://host[:port][/base],...`` (names ``[a-z0-9-]+``, each once); ``http://``
    only to a loopback host or with ``allow_plaintext``. The base keeps no trailing slash."""
    if value is None:
        return ()
    upstreams: list[tuple[str, str]] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        label, sep, url = (part.strip() for part in item.partition("="))
        if not sep or not url:
            raise ConfigError(name, f"{item[:64]!r} is not name=https://host[:port][/base]")
        if not _UPSTREAM_NAME.fullmatch(label):
            raise ConfigError(
                name, f"upstream name {label[:64]!r} must be lower-case letters, digits and '-'"
            )
        if any(label == known for known, _ in upstreams):
            raise ConfigError(name, f"upstream name {label!r} is given twice")
        upstreams.append((label, _upstream_url(name, label, url, allow_plaintext)))
    return tuple(upstreams)


def _upstream_url(name: str, label: str, url: str, allow_plaintext: bool) -> str:
    try:
        parse_url(name, url)
    except ConfigError as exc:
        raise ConfigError(name, f"upstream {label!r}: {exc.problem}") from None
    parts = urlsplit(url)
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ConfigError(name, f"upstream {label!r}: a base URL has no query or fragment")
    loopback = is_loopback_host(parts.hostname or "")
    if parts.scheme == "http" and not allow_plaintext and not loopback:
        raise ConfigError(
            name,
            f"upstream {label!r}: http:// to {parts.hostname!r}, not a loopback address, would "
            f"send the token in clear text; use https:// (SIDECAR_UPSTREAM_CA_FILE for a private "
            f"CA), or set {ALLOW_PLAINTEXT}=true when the network encrypts pod traffic",
        )
    return url.rstrip("/")


def parse_grpc_target(name: str, value: str) -> str:
    """``host:port`` of a gRPC API (a host is required; ``[v6]:port`` for IPv6)."""
    if "://" in value:
        raise ConfigError(name, f"{value[:64]!r} is host:port, without a scheme (TLS is implied)")
    host, port = parse_addr(name, value)
    if value.startswith(":"):
        raise ConfigError(name, f"{value!r} has no host (e.g. api.example.com:443)")
    if port == 0:
        raise ConfigError(name, "port 0 is not a port to call")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ca_bundle(e: Env, name: str) -> str | None:
    """A CA bundle that can be read and loads as PEM certificates, or None."""
    path = e.file(name)
    if path is not None:
        try:
            ssl.create_default_context(cafile=path)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(name, f"{path!r} holds no PEM CA certificate ({exc})") from None
    return path
