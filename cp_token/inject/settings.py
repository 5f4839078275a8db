"""The injector's configuration: ``CP_TOKEN_INJECT_*`` (+ metrics address and logging).

Read from a mapping (tests pass a dict, the command passes ``os.environ``) and validated at
start; a mistake raises :class:`~cp_token.config.ConfigError` naming the variable, which the
command turns into exit code 2 and one line.
"""

from __future__ import annotations

import functools
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from cp_token.config import (
    LOG_FORMATS,
    LOG_LEVELS,
    ConfigError,
    _choice,
    _get,
    check_readable,
    parse_addr,
    parse_number,
    parse_url,
)

__all__ = ["MIN_TOKEN_EXPIRATION", "InjectSettings", "load_inject_settings"]

# The API server refuses a projected token shorter than 10 minutes, and caps it at 2**32 s.
MIN_TOKEN_EXPIRATION = 600
MAX_TOKEN_EXPIRATION = 2**32

# A container image reference: [registry[:port]/]path[:tag][@digest], no spaces, not
# starting with a separator. Deliberately loose (the kubelet is the real judge): it catches
# an empty value, whitespace or a stray scheme ("https://...").
_IMAGE = re.compile(r"[a-z0-9][A-Za-z0-9._\-/:@]*")
# An audience is an opaque string, but one with whitespace or a comma is a mistake.
_AUDIENCE = re.compile(r"[^\s,]+")


@dataclass(frozen=True)
class InjectSettings:
    """Validated configuration of the sidecar injector (``cp-token inject``)."""

    image: str
    cp_url: str
    tls_cert_file: str = ""
    tls_key_file: str = ""
    audience: str = "ambient-cp"
    token_expiration: int = 3600
    listen_host: str = "0.0.0.0"
    listen_port: int = 8443
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9090
    log_level: str = "info"
    log_format: str = "json"


def _required(env: Mapping[str, str], name: str, what: str) -> str:
    value = _get(env, name)
    if value is None:
        raise ConfigError(name, f"required: {what}")
    return value


def _check_pair(cert: str, key: str) -> None:
    """Fail at start, naming the variable, when the pair does not load (not PEM, mismatch)."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            "CP_TOKEN_INJECT_TLS_CERT_FILE",
            f"certificate and key (CP_TOKEN_INJECT_TLS_KEY_FILE) do not load ({exc})",
        ) from None


def load_inject_settings(env: Mapping[str, str] | None = None) -> InjectSettings:
    """Read and validate the injector's configuration; raises :class:`ConfigError`."""
    env = os.environ if env is None else env
    g = functools.partial(_get, env)
    host, port = parse_addr(
        "CP_TOKEN_INJECT_LISTEN_ADDR", g("CP_TOKEN_INJECT_LISTEN_ADDR") or ":8443"
    )
    m_host, m_port = parse_addr("CP_TOKEN_METRICS_ADDR", g("CP_TOKEN_METRICS_ADDR") or ":9090")
    cert = _required(env, "CP_TOKEN_INJECT_TLS_CERT_FILE", "the webhook's serving certificate")
    key = _required(env, "CP_TOKEN_INJECT_TLS_KEY_FILE", "the serving certificate's private key")
    check_readable("CP_TOKEN_INJECT_TLS_CERT_FILE", cert)
    check_readable("CP_TOKEN_INJECT_TLS_KEY_FILE", key)
    _check_pair(cert, key)
    image = _required(env, "CP_TOKEN_INJECT_IMAGE", "the image of the injected sidecar")
    if not _IMAGE.fullmatch(image) or "://" in image:
        raise ConfigError(
            "CP_TOKEN_INJECT_IMAGE",
            f"{image!r} is not an image reference (e.g. registry.example.com/cp-token:1.0)",
        )
    cp_url = _required(env, "CP_TOKEN_INJECT_CP_URL", "the CP token service's /token URL")
    parse_url("CP_TOKEN_INJECT_CP_URL", cp_url)
    audience = g("CP_TOKEN_INJECT_AUDIENCE") or "ambient-cp"
    if not _AUDIENCE.fullmatch(audience):
        raise ConfigError(
            "CP_TOKEN_INJECT_AUDIENCE", f"{audience!r} is not one audience (no spaces or commas)"
        )
    expiration = parse_number(
        "CP_TOKEN_INJECT_TOKEN_EXPIRATION",
        g("CP_TOKEN_INJECT_TOKEN_EXPIRATION"),
        3600,
        minimum=MIN_TOKEN_EXPIRATION,
        integer=True,
    )
    if expiration > MAX_TOKEN_EXPIRATION:
        raise ConfigError(
            "CP_TOKEN_INJECT_TOKEN_EXPIRATION", f"must be at most {MAX_TOKEN_EXPIRATION} seconds"
        )
    return InjectSettings(
        image=image,
        cp_url=cp_url,
        tls_cert_file=cert,
        tls_key_file=key,
        audience=audience,
        token_expiration=int(expiration),
        listen_host=host,
        listen_port=port,
        metrics_host=m_host,
        metrics_port=m_port,
        log_level=_choice("CP_TOKEN_LOG_LEVEL", g("CP_TOKEN_LOG_LEVEL"), "info", LOG_LEVELS),
        log_format=_choice("CP_TOKEN_LOG_FORMAT", g("CP_TOKEN_LOG_FORMAT"), "json", LOG_FORMATS),
    )
