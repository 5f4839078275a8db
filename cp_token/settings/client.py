"""The client library's configuration (``cp_token.client``, ``cp-token get``).

Standard library only, and nothing of the server side: ``pip install cp-token`` (httpx
alone) must be able to import it. The sidecar reads the same connection variables
(:func:`upstream_fields`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .common import ALLOW_PLAINTEXT, CP_AUDIENCE, Env, parse_addr

__all__ = [
    "DEFAULT_SA_TOKEN_FILE",
    "SA_TOKEN_DIR",
    "TIMEOUT",
    "ClientSettings",
    "load_client_settings",
    "upstream_fields",
]

# Where a pod's projected ServiceAccount token is mounted; the file is named after the
# audience it is projected for.
SA_TOKEN_DIR = "/var/run/secrets/tokens"
DEFAULT_SA_TOKEN_FILE = f"{SA_TOKEN_DIR}/{CP_AUDIENCE}"
TIMEOUT = 10.0  # seconds per request to the CP or the sidecar


@dataclass(frozen=True)
class ClientSettings:
    """Where the client library gets its token: the first source that is set decides."""

    sidecar_url: str | None = None
    cp_token_url: str | None = None
    bot_token: str | None = None
    sa_token_file: str = DEFAULT_SA_TOKEN_FILE
    ca_file: str | None = None
    timeout: float = TIMEOUT
    # AMBIENT_CP_ALLOW_PLAINTEXT: an http:// AMBIENT_CP_TOKEN_URL to a non-loopback host
    allow_plaintext: bool = False
    # A sealed pod (SPEC "Sealed mode"): no token here; API calls go through the sidecar
    api_url: str | None = None
    grpc_addr: str | None = None

    @property
    def sealed(self) -> bool:
        """True in a sealed pod: ``AMBIENT_API_URL`` or ``AMBIENT_GRPC_ADDR`` is set."""
        return bool(self.api_url or self.grpc_addr)

    @property
    def source(self) -> str:
        """``sealed`` (no token to be had here), ``sidecar``, ``direct``, ``bot`` or
        ``none``."""
        if self.sealed:
            return "sealed"
        if self.sidecar_url:
            return "sidecar"
        if self.cp_token_url:
            return "direct"
        if self.bot_token:
            return "bot"
        return "none"


def upstream_fields(e: Env) -> dict[str, Any]:
    """How to reach the CP (shared with the sidecar): ``sa_token_file``, ``ca_file`` (a
    readable file) and ``timeout``."""
    return {
        "sa_token_file": e.get("AMBIENT_SA_TOKEN_FILE") or DEFAULT_SA_TOKEN_FILE,
        "ca_file": e.file("AMBIENT_CP_CA_FILE"),
        "timeout": e.number("AMBIENT_CP_TOKEN_TIMEOUT_SECS", TIMEOUT, minimum=0.001),
    }


def load_client_settings(env: Mapping[str, str] | None = None) -> ClientSettings:
    """Read the client library's variables (default: ``os.environ``); raises
    :class:`~cp_token.settings.common.ConfigError`."""
    e = Env(env)
    allow = e.flag(ALLOW_PLAINTEXT, ClientSettings.allow_plaintext)
    # The first source that is set decides; the ones after it are not read at all, so a
    # mistake in a variable that does not decide cannot stop a pod whose source is fine.
    sidecar_url = e.url("AMBIENT_TOKEN_SIDECAR_URL")
    cp_token_url = None if sidecar_url else e.cp_url("AMBIENT_CP_TOKEN_URL", allow)
    return ClientSettings(
        sidecar_url=sidecar_url,
        cp_token_url=cp_token_url,
        bot_token=None if sidecar_url or cp_token_url else e.get("BOT_TOKEN"),
        allow_plaintext=allow,
        **upstream_fields(e),
        api_url=e.url("AMBIENT_API_URL"),
        grpc_addr=_grpc_addr(e),
    )


def _grpc_addr(e: Env) -> str | None:
    """``AMBIENT_GRPC_ADDR``: the sidecar's gRPC listener, ``host:port``."""
    value = e.get("AMBIENT_GRPC_ADDR")
    if value is None:
        return None
    host, port = parse_addr("AMBIENT_GRPC_ADDR", value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
