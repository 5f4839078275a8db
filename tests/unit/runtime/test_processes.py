"""Child processes on loopback, the pure part: free ports and a clean environment (starting
and stopping real processes is tests/integration/test_processes.py)."""

from __future__ import annotations

import socket

import pytest

from cp_token.runtime.processes import clean_env, free_port


def test_a_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_free_port_prefers_the_asked_one_when_free() -> None:
    port = free_port()
    assert free_port(port) == port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        assert free_port(port) != port


def test_clean_env_drops_every_product_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CP_TOKEN_URL", "SIDECAR_LISTEN_ADDR", "AMBIENT_X", "OIDC_Y", "KUBECONFIG"):
        monkeypatch.setenv(name, "leak")
    monkeypatch.setenv("BOT_TOKEN", "leak")
    env = clean_env({"CP_TOKEN_AUTHN": "static"})
    assert "leak" not in env.values()
    assert env["CP_TOKEN_AUTHN"] == "static" and env["PATH"]
