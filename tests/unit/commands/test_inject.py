"""``cp-token inject`` in this process on loopback sockets: ``/mutate`` over HTTPS with the
configured certificate, the probes and metrics over HTTP on their own port, SIGTERM drains
and exits 0; a busy port is named by its variable. (As a child process, with a certificate
renewal: tests/integration/test_inject_process.py.)"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
from pathlib import Path

import httpx
import pytest
import trustme

from cp_token.commands.inject import run_inject, serve
from cp_token.http.serving import ServerGroup, bind_listener
from cp_token.inject.wiring import build_injector
from cp_token.runtime.errors import ConfigError
from cp_token.settings.inject import InjectSettings, load_inject_settings
from tests.fakes.admission import admission_review, opted_in_pod, patch_of

CP_URL = "https://cp-token.ambient-code.svc:8080/token"


@pytest.fixture
def ca_and_env(tmp_path: Path) -> tuple[trustme.CA, dict[str, str]]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    env = {
        "CP_TOKEN_INJECT_TLS_CERT_FILE": str(cert),
        "CP_TOKEN_INJECT_TLS_KEY_FILE": str(key),
        "CP_TOKEN_INJECT_IMAGE": "cp-token:1",
        "CP_TOKEN_INJECT_CP_URL": CP_URL,
    }
    return ca, env


async def test_serves_mutate_over_https_and_probes_over_http_then_sigterm_exits_0(
    ca_and_env: tuple[trustme.CA, dict[str, str]],
) -> None:
    ca, env = ca_and_env
    settings = load_inject_settings(env)
    api, probes = bind_listener("127.0.0.1", 0), bind_listener("127.0.0.1", 0)
    api_url = f"https://127.0.0.1:{api.getsockname()[1]}"
    probe_url = f"http://127.0.0.1:{probes.getsockname()[1]}"
    group = ServerGroup()
    injector = build_injector(settings, on_fatal=lambda reason: group.stop(1))
    serving = asyncio.create_task(serve(injector, api, probes, group))
    tls = ssl.create_default_context()
    ca.configure_trust(tls)
    try:
        async with httpx.AsyncClient(base_url=probe_url, timeout=10) as plain:
            ready = await plain.get("/readyz")
            for _ in range(500):  # bounded: each try is a real request, no wait between
                if ready.status_code == 200:
                    break
                assert ready.text == "not ready: starting"
                ready = await plain.get("/readyz")
            assert ready.status_code == 200
            async with httpx.AsyncClient(base_url=api_url, verify=tls, timeout=10) as client:
                answer = await client.post("/mutate", json=admission_review(opted_in_pod()))
            assert answer.status_code == 200
            assert answer.json()["response"]["allowed"] is True
            assert patch_of(answer.json())  # the sidecar was injected
            page = (await plain.get("/metrics")).text
            assert 'cp_token_inject_requests_total{result="mutated"} 1.0' in page
            with pytest.raises(httpx.HTTPError):  # the probe port speaks no TLS
                async with httpx.AsyncClient(verify=tls, timeout=5) as wrong:
                    await wrong.get(f"https://127.0.0.1:{probes.getsockname()[1]}/readyz")
    finally:
        if not serving.done():
            os.kill(os.getpid(), signal.SIGTERM)  # the group's handler: drain, exit 0
    assert await asyncio.wait_for(serving, 30) == 0


def test_a_busy_webhook_port_is_named_by_its_variable(
    ca_and_env: tuple[trustme.CA, dict[str, str]],
) -> None:
    _, env = ca_and_env
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = load_inject_settings({**env, "CP_TOKEN_INJECT_LISTEN_ADDR": f"127.0.0.1:{port}"})
        assert isinstance(settings, InjectSettings)
        with pytest.raises(ConfigError) as info:
            run_inject(settings)
    assert info.value.variable == "CP_TOKEN_INJECT_LISTEN_ADDR"
    assert f"127.0.0.1:{port}" in str(info.value)
