"""``cp-token serve``: the plain-HTTP warning, both servers run and stop together (a dead
background task is exit 1), a busy port named by its variable."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest
import trustme

from cp_token.commands.serve import plaintext_warning, run_service, serve
from cp_token.http.serving import ServerGroup, bind_listener
from cp_token.runtime.errors import ConfigError
from cp_token.settings.cp import load_settings
from cp_token.wiring import build_service
from tests.fakes.loop import run_until

ROOT = Path(__file__).resolve().parents[3]


STATIC = {
    "CP_TOKEN_AUTHN": "static",
    "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ROOT / "examples" / "config" / "dev-identities.json"),
    "CP_TOKEN_MINTER": "static",
    "CP_TOKEN_STATIC_TOKEN": "t",
}


def test_the_cp_warns_when_it_serves_plain_http_beyond_loopback(tmp_path: Path) -> None:
    everywhere = load_settings({**STATIC, "CP_TOKEN_LISTEN_ADDR": ":8080"})
    warning = plaintext_warning(everywhere)
    assert warning is not None
    assert "0.0.0.0:8080" in warning and "clear text" in warning
    assert "CP_TOKEN_TLS_CERT_FILE" in warning
    loopback = load_settings({**STATIC, "CP_TOKEN_LISTEN_ADDR": "127.0.0.1:8080"})
    assert plaintext_warning(loopback) is None
    leaf = trustme.CA().issue_cert("cp-token.ambient-code.svc")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    tls = {"CP_TOKEN_TLS_CERT_FILE": str(cert), "CP_TOKEN_TLS_KEY_FILE": str(key)}
    assert plaintext_warning(load_settings({**STATIC, **tls})) is None


async def test_a_dead_background_task_stops_both_servers_with_exit_1(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The service is built with its server group's stop as the fatal hook (nothing is
    patched on afterwards): calling it stops both servers with exit code 1. The service
    listens beyond loopback without TLS here, so the warning is logged first."""
    group = ServerGroup()
    service = build_service(
        load_settings({**STATIC, "CP_TOKEN_LISTEN_ADDR": ":8080"}),
        on_fatal=lambda reason: group.stop(1),
    )
    api, metrics = bind_listener("127.0.0.1", 0), bind_listener("127.0.0.1", 0)
    with caplog.at_level(logging.WARNING, logger="cp_token.serve"):
        serving = asyncio.create_task(serve(service, api, metrics, group))
        await run_until(lambda: any(s.started for s in group._servers), "the servers started")
        service.on_fatal("background task minter died")
        assert await asyncio.wait_for(serving, 30) == 1
    assert "serving plain HTTP on 0.0.0.0:8080" in caplog.text


def test_a_busy_api_port_is_named_by_its_variable() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        service = build_service(
            load_settings({**STATIC, "CP_TOKEN_LISTEN_ADDR": f"127.0.0.1:{port}"})
        )
        with pytest.raises(ConfigError) as info:
            run_service(service)
    assert info.value.variable == "CP_TOKEN_LISTEN_ADDR"
    assert f"127.0.0.1:{port}" in str(info.value)
