"""Every component's configuration, from one import path (older code and tests use it).

The settings live in :mod:`cp_token.settings`, one module per component; import from there
in new code (the sidecar and the client must, to load only what they need).
"""

from __future__ import annotations

from cp_token.settings.client import (
    DEFAULT_SA_TOKEN_FILE,
    ClientSettings,
    load_client_settings,
)
from cp_token.settings.common import (
    LOG_FORMATS,
    LOG_LEVELS,
    SECRET_FIELDS,
    ConfigError,
    check_readable,
    is_loopback_host,
    parse_addr,
    parse_bool,
    parse_list,
    parse_number,
    parse_url,
    redacted,
)
from cp_token.settings.cp import (
    AUTHN_MODES,
    MINTERS,
    Settings,
    issuer_from_url,
    load_settings,
    parse_label,
    parse_rate,
    parse_scopes,
)
from cp_token.settings.sidecar import SidecarSettings, load_sidecar_settings, parse_mode

__all__ = [
    "AUTHN_MODES",
    "DEFAULT_SA_TOKEN_FILE",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MINTERS",
    "SECRET_FIELDS",
    "ClientSettings",
    "ConfigError",
    "Settings",
    "SidecarSettings",
    "check_readable",
    "is_loopback_host",
    "issuer_from_url",
    "load_client_settings",
    "load_settings",
    "load_sidecar_settings",
    "parse_addr",
    "parse_bool",
    "parse_label",
    "parse_list",
    "parse_mode",
    "parse_number",
    "parse_rate",
    "parse_scopes",
    "parse_url",
    "redacted",
]
