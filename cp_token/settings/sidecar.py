"""The token sidecar's configuration (``cp-token-sidecar``): env -> :class:`SidecarSettings`.

Standard library only and small: every session pod runs a sidecar, and what it imports is
resident memory in each.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
    "LISTEN_ADDR",
    "REFRESH_FRACTION",
    "SidecarSettings",
    "load_sidecar_settings",
    "parse_mode",
]

# The defaults are written once, in SidecarSettings below (the loader reads them from there),
# but for this one, which the holder uses too.
REFRESH_FRACTION = 0.5


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


# The default address as one value: what injected sidecars are configured with.
LISTEN_ADDR = f"{SidecarSettings.listen_host}:{SidecarSettings.listen_port}"


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
    return SidecarSettings(
        cp_token_url=url,
        allow_plaintext=allow,
        **_listeners(e),
        **_token_file(e),
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
