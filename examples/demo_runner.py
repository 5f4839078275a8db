"""A stand-in for a session runner: it calls the platform's API with a token from cp-token.

The token comes from the client library, exactly as a real runner gets it
(``TokenSource.from_env()``: the sidecar, the CP, or ``BOT_TOKEN``, in that order), and
``TokenAuth`` adds it to every request and retries once with a fresh token on a 401.

Run it with ``python examples/demo_runner.py``. Environment, besides the client library's:

``DEMO_API_URL``        what to call (default ``http://127.0.0.1:8001/whoami``)
``DEMO_CALLS``          how many calls (default 3; 0 = until interrupted)
``DEMO_INTERVAL_SECS``  pause between calls (default 2)

Prints one line per call, never the token. Exit 0 if every call got a 200, 1 if any failed,
2 on a bad setting.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from cp_token.client import TokenAuth, TokenError, TokenRejected, TokenSource


class ConfigError(Exception):
    """A bad ``DEMO_*`` variable; ``main`` prints it as one line and exits 2."""


@dataclass(frozen=True)
class RunnerConfig:
    """What to call, how often."""

    api_url: str
    calls: int
    interval_secs: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> RunnerConfig:
        """Read and validate the ``DEMO_*`` variables."""
        api_url = env.get("DEMO_API_URL", "http://127.0.0.1:8001/whoami")
        parts = urlsplit(api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"DEMO_API_URL: not an http(s) URL: {api_url!r}")
        try:
            calls = int(env.get("DEMO_CALLS", "3"))
        except ValueError:
            raise ConfigError("DEMO_CALLS: not an integer") from None
        if calls < 0:
            raise ConfigError("DEMO_CALLS: must be >= 0 (0 = forever)")
        try:
            interval = float(env.get("DEMO_INTERVAL_SECS", "2"))
        except ValueError:
            raise ConfigError("DEMO_INTERVAL_SECS: not a number") from None
        if not interval >= 0:
            raise ConfigError("DEMO_INTERVAL_SECS: must be >= 0")
        return cls(api_url=api_url, calls=calls, interval_secs=interval)


def call_once(client: httpx.Client, url: str, number: int) -> tuple[bool, str]:
    """Make one call; return whether it succeeded and the line that describes it."""
    prefix = f"call {number}:"
    try:
        response = client.get(url)
    except TokenRejected as exc:
        return False, f"{prefix} token refused by cp-token ({exc.status}): {exc.description}"
    except TokenError as exc:
        return False, f"{prefix} no token: {exc}"
    except httpx.HTTPError as exc:
        return False, f"{prefix} request failed: {type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return False, f"{prefix} HTTP {response.status_code} {response.text.strip()[:200]}"
    try:
        body = response.json()
        who = f"sub={body['sub']} session_id={body['session_id']} exp={body['exp']}"
    except (ValueError, KeyError, TypeError):
        return False, f"{prefix} HTTP 200 with an unexpected body"
    return True, f"{prefix} HTTP 200 {who}"


def run(config: RunnerConfig, source: TokenSource) -> int:
    """Make the calls; return the process exit code."""
    failures = 0
    number = 0
    # trust_env=False: no proxy in the path of a bearer token.
    with httpx.Client(auth=TokenAuth(source), timeout=10.0, trust_env=False) as client:
        while config.calls == 0 or number < config.calls:
            number += 1
            ok, line = call_once(client, config.api_url, number)
            print(line, flush=True)
            failures += not ok
            if config.calls == 0 or number < config.calls:
                time.sleep(config.interval_secs)
    if failures:
        print(f"demo-runner: {failures} of {number} calls failed", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    """Entry point: configuration errors exit 2, failed calls exit 1."""
    try:
        config = RunnerConfig.from_env()
    except ConfigError as exc:
        print(f"demo-runner: {exc}", file=sys.stderr)
        return 2
    try:
        source = TokenSource.from_env()
    except (TokenError, ValueError) as exc:
        print(f"demo-runner: {exc}", file=sys.stderr)
        return 2
    try:
        return run(config, source)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
