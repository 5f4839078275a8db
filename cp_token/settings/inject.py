"""The injector's configuration (``cp-token inject``): ``CP_TOKEN_INJECT_*``, plus the metrics
address and logging it shares with the CP.

Read from a mapping (tests pass a dict, the command passes ``os.environ``) and validated at
start; a mistake raises :class:`~cp_token.settings.common.ConfigError` naming the variable,
which the command turns into exit code 2 and one line.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from cp_token.runtime.errors import ConfigError

from .common import (
    ALL_INTERFACES,
    ALLOW_PLAINTEXT,
    CP_AUDIENCE,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    LOG_FORMAT,
    LOG_LEVEL,
    Env,
    check_readable,
)
from .cp import METRICS_PORT, max_per_client
from .sidecar import Upstreams, parse_grpc_target, parse_upstreams

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
# A ConfigMap name: an RFC 1123 DNS subdomain.
_CONFIGMAP = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True)
class InjectSettings:
    """Validated configuration of the sidecar injector (``cp-token inject``)."""

    image: str
    cp_url: str
    tls_cert_file: str = ""
    tls_key_file: str = ""
    audience: str = CP_AUDIENCE
    token_expiration: int = 3600
    listen_host: str = ALL_INTERFACES
    listen_port: int = 8443
    metrics_host: str = ALL_INTERFACES
    metrics_port: int = METRICS_PORT
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    log_level: str = LOG_LEVEL
    log_format: str = LOG_FORMAT
    # CP_TOKEN_INJECT_CA_CONFIGMAP: the ConfigMap (in the pod's namespace) holding the CP's CA
    # as ca.crt; injected sidecars mount it and get AMBIENT_CP_CA_FILE
    ca_configmap: str | None = None
    # AMBIENT_CP_ALLOW_PLAINTEXT: allows an http:// cp_url to a non-loopback host, and is then
    # passed on to the injected sidecars
    allow_plaintext: bool = False
    # Sealed pods (annotation ambient-code.io/token-sidecar-mode: sealed): the upstreams their
    # sidecar adds the token to, SIDECAR_UPSTREAMS and SIDECAR_GRPC_UPSTREAM's syntax
    upstreams: Upstreams = ()
    grpc_upstream: str = ""


def load_inject_settings(env: Mapping[str, str] | None = None) -> InjectSettings:
    """Read and validate the injector's configuration (default: ``os.environ``); raises
    :class:`ConfigError`."""
    e = Env(env)
    host, port = e.addr("CP_TOKEN_INJECT_LISTEN_ADDR", f":{InjectSettings.listen_port}")
    m_host, m_port = e.addr("CP_TOKEN_METRICS_ADDR", f":{METRICS_PORT}")
    cert, key = _serving_pair(e)
    e.required("CP_TOKEN_INJECT_CP_URL", "required: the CP token service's /token URL")
    allow = e.flag(ALLOW_PLAINTEXT, InjectSettings.allow_plaintext)
    return InjectSettings(
        image=_image(e),
        cp_url=str(e.cp_url("CP_TOKEN_INJECT_CP_URL", allow)),
        ca_configmap=_ca_configmap(e),
        allow_plaintext=allow,
        tls_cert_file=cert,
        tls_key_file=key,
        audience=_audience(e),
        token_expiration=_token_expiration(e),
        listen_host=host,
        listen_port=port,
        metrics_host=m_host,
        metrics_port=m_port,
        max_connections_per_client=max_per_client(e),
        **e.logging("CP_TOKEN_LOG_LEVEL", "CP_TOKEN_LOG_FORMAT"),
        upstreams=parse_upstreams(
            "CP_TOKEN_INJECT_UPSTREAMS",
            e.get("CP_TOKEN_INJECT_UPSTREAMS"),
            e.flag(ALLOW_PLAINTEXT, False),
        ),
        grpc_upstream=_grpc_upstream(e),
    )


def _grpc_upstream(e: Env) -> str:
    """``host:port`` of the gRPC API sealed pods call, or "" when unset."""
    value = e.get("CP_TOKEN_INJECT_GRPC_UPSTREAM")
    return "" if value is None else parse_grpc_target("CP_TOKEN_INJECT_GRPC_UPSTREAM", value)


def _serving_pair(e: Env) -> tuple[str, str]:
    """The webhook's certificate and key: both set, readable, and loading as a pair (not PEM,
    or a mismatch, fails at start naming the variable)."""
    cert_name, key_name = "CP_TOKEN_INJECT_TLS_CERT_FILE", "CP_TOKEN_INJECT_TLS_KEY_FILE"
    cert = e.required(cert_name, "required: the webhook's serving certificate")
    key = e.required(key_name, "required: the serving certificate's private key")
    check_readable(cert_name, cert)
    check_readable(key_name, key)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            cert_name, f"certificate and key ({key_name}) do not load ({exc})"
        ) from None
    return cert, key


def _image(e: Env) -> str:
    image = e.required("CP_TOKEN_INJECT_IMAGE", "required: the image of the injected sidecar")
    if not _IMAGE.fullmatch(image) or "://" in image:
        raise ConfigError(
            "CP_TOKEN_INJECT_IMAGE",
            f"{image!r} is not an image reference (e.g. registry.example.com/cp-token:1.0)",
        )
    return image


def _ca_configmap(e: Env) -> str | None:
    name = e.get("CP_TOKEN_INJECT_CA_CONFIGMAP")
    if name is not None and (len(name) > 253 or not _CONFIGMAP.fullmatch(name)):
        raise ConfigError(
            "CP_TOKEN_INJECT_CA_CONFIGMAP",
            f"{name!r} is not a ConfigMap name (lower-case DNS subdomain, e.g. cp-token-ca)",
        )
    return name


def _audience(e: Env) -> str:
    audience = e.get("CP_TOKEN_INJECT_AUDIENCE") or CP_AUDIENCE
    if not _AUDIENCE.fullmatch(audience):
        raise ConfigError(
            "CP_TOKEN_INJECT_AUDIENCE", f"{audience!r} is not one audience (no spaces or commas)"
        )
    return audience


def _token_expiration(e: Env) -> int:
    name = "CP_TOKEN_INJECT_TOKEN_EXPIRATION"
    expiration = e.count(name, InjectSettings.token_expiration, minimum=MIN_TOKEN_EXPIRATION)
    if expiration > MAX_TOKEN_EXPIRATION:
        raise ConfigError(name, f"must be at most {MAX_TOKEN_EXPIRATION} seconds")
    return expiration
