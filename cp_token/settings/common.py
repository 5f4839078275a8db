"""What every component's settings share: :class:`ConfigError`, the value parsers, and
:class:`Env`, the typed reader each loader uses.

Standard library only: the client library and the sidecar import this module, and neither
may pull in the server's dependencies.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any
from urllib.parse import urlsplit

from cp_token.runtime.clock import MAX_SECONDS
from cp_token.runtime.errors import ConfigError

__all__ = [
    "ALLOW_PLAINTEXT",
    "ALL_INTERFACES",
    "CP_AUDIENCE",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_CONNECTIONS_PER_CLIENT",
    "LOG_FORMAT",
    "LOG_FORMATS",
    "LOG_LEVEL",
    "LOG_LEVELS",
    "SECRET_FIELDS",
    "Env",
    "check_readable",
    "choice",
    "env_value",
    "is_loopback_host",
    "parse_addr",
    "parse_bool",
    "parse_list",
    "parse_number",
    "parse_url",
    "plaintext_refusal",
    "redacted",
]

ALL_INTERFACES = "0.0.0.0"  # the host of a listen address written ":port"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
LOG_LEVEL = "info"
LOG_FORMAT = "json"
# The audience pods project their ServiceAccount token for: the CP accepts it
# (CP_TOKEN_AUDIENCES), the injector asks for it (CP_TOKEN_INJECT_AUDIENCE), and the projected
# file is named after it (AMBIENT_SA_TOKEN_FILE).
CP_AUDIENCE = "ambient-cp"
# Open connections per serving port (CP_TOKEN_MAX_CONNECTIONS; the sidecar's and the
# injector's fixed cap).
DEFAULT_MAX_CONNECTIONS = 4096
# Open connections from one source address per serving port
# (CP_TOKEN_MAX_CONNECTIONS_PER_CLIENT; 0: no such cap).
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 256
# Fields that never appear in a log line, whichever component's settings they belong to.
SECRET_FIELDS = frozenset({"oidc_client_secret", "static_token", "bot_token"})


# --- parsers: (variable name, text) -> value, or ConfigError naming the variable -------------


def env_value(env: Mapping[str, str], name: str) -> str | None:
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
    host = m.group("v6") or m.group("host") or ALL_INTERFACES
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


# SPEC "Transport security": the variable that allows an http:// CP URL to a non-loopback host.
ALLOW_PLAINTEXT = "AMBIENT_CP_ALLOW_PLAINTEXT"


def plaintext_refusal(name: str, url: str, allow: bool) -> ConfigError | None:
    """The error for an ``http://`` URL ``url`` (read from ``name``) whose host is not a
    loopback address, unless ``allow`` (``AMBIENT_CP_ALLOW_PLAINTEXT=true``); else None.

    A ServiceAccount token goes to that URL, and a minted token comes back: on a network they
    travel over TLS. ``http://`` to loopback (the sidecar, ``cp-token dev``) never leaves the
    pod or the machine.
    """
    parts = urlsplit(url)
    if allow or parts.scheme != "http" or is_loopback_host(parts.hostname or ""):
        return None
    return ConfigError(
        name,
        f"http:// to {parts.hostname!r}, not a loopback address, would send credentials in "
        f"clear text; use https:// (with AMBIENT_CP_CA_FILE for a private CA), or set "
        f"{ALLOW_PLAINTEXT}=true when the network encrypts pod traffic (a mesh) or in local dev",
    )


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
    """Parse a non-negative number of seconds, at most :data:`MAX_SECONDS` (or a count when
    ``integer``)."""
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
    if not integer and number > MAX_SECONDS:
        raise ConfigError(name, f"must be at most {MAX_SECONDS:g} seconds (10 years), got {value}")
    return number


def parse_list(value: str | None, default: str) -> tuple[str, ...]:
    """Parse a comma list, dropping blanks."""
    raw = default if value is None else value
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def check_readable(name: str, path: str) -> str:
    """Fail at start if a configured file cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ConfigError(name, f"cannot read {path!r} ({exc.strerror or exc})") from None
    return path


def choice(name: str, value: str | None, default: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (case-insensitive), ``default`` when unset."""
    chosen = (value or default).lower()
    if chosen not in choices:
        raise ConfigError(name, f"unknown value {value!r} (expected one of: {', '.join(choices)})")
    return chosen


def redacted(settings: Any) -> dict[str, Any]:
    """Settings (any component's dataclass) as a dict with secrets replaced, for the start-up
    log line."""
    out: dict[str, Any] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name in SECRET_FIELDS:
            value = "<redacted>" if value else None
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


# --- the reader ------------------------------------------------------------------------------


class Env:
    """Typed reads of one environment: each call names its variable once, and so does the
    :class:`ConfigError` it raises.

    ``env`` defaults to ``os.environ``; ``overrides`` (command-line flags, by variable name)
    take precedence over it.
    """

    def __init__(
        self, env: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
    ) -> None:
        base = os.environ if env is None else env
        self._env: Mapping[str, str] = {**base, **overrides} if overrides else base

    def raw(self, name: str) -> str | None:
        """The value as set (not stripped): for lists and labels, where empty means "none"."""
        return self._env.get(name)

    def get(self, name: str) -> str | None:
        """The value stripped; unset and empty are both None."""
        return env_value(self._env, name)

    def required(self, name: str, problem: str) -> str:
        """The value, or ConfigError ``problem`` when it is unset or empty."""
        value = self.get(name)
        if value is None:
            raise ConfigError(name, problem)
        return value

    def url(self, name: str) -> str | None:
        """An http(s) URL without user-info, or None."""
        value = self.get(name)
        return None if value is None else parse_url(name, value)

    def cp_url(self, name: str, allow_plaintext: bool) -> str | None:
        """A URL credentials are sent to: as :meth:`url`, and ``http://`` only to a loopback
        host unless ``allow_plaintext`` (:func:`plaintext_refusal`)."""
        value = self.url(name)
        refusal = None if value is None else plaintext_refusal(name, value, allow_plaintext)
        if refusal is not None:
            raise refusal
        return value

    def file(self, name: str) -> str | None:
        """The path of a file that can be read now, or None."""
        value = self.get(name)
        return None if value is None else check_readable(name, value)

    def addr(self, name: str, default: str) -> tuple[str, int]:
        """``(host, port)`` from ``host:port``."""
        return parse_addr(name, self.get(name) or default)

    def flag(self, name: str, default: bool) -> bool:
        """A boolean."""
        return parse_bool(name, self.get(name), default)

    def number(self, name: str, default: float, minimum: float = 0.0) -> float:
        """A finite number, at least ``minimum``."""
        return parse_number(name, self.get(name), default, minimum=minimum)

    def count(self, name: str, default: int, minimum: int = 1) -> int:
        """An integer, at least ``minimum``."""
        return int(parse_number(name, self.get(name), default, minimum=minimum, integer=True))

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        """One of ``choices``."""
        return choice(name, self.get(name), default, choices)

    def logging(self, level: str, format: str) -> dict[str, Any]:
        """``log_level`` and ``log_format``, from the variables named ``level`` and
        ``format``."""
        return {
            "log_level": self.choice(level, LOG_LEVEL, LOG_LEVELS),
            "log_format": self.choice(format, LOG_FORMAT, LOG_FORMATS),
        }

    def items(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """A comma list; set but empty is the empty list."""
        value = self.raw(name)
        return default if value is None else parse_list(value, "")
