"""The injector's wiring: built once with how a fatal failure ends the process; ready once
its webhook serves; a dead background task is fatal."""

from __future__ import annotations

import asyncio
from pathlib import Path

import trustme

from cp_token.inject.wiring import build_injector
from cp_token.settings.inject import InjectSettings


def settings(tmp_path: Path) -> InjectSettings:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    leaf = trustme.CA().issue_cert("cp-token-inject.ambient-code.svc")
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return InjectSettings(
        image="registry.example.com/cp-token:1",
        cp_url="https://cp-token.ambient-code.svc:8080/token",
        tls_cert_file=str(cert),
        tls_key_file=str(key),
    )


async def test_ready_only_while_the_webhook_serves(tmp_path: Path) -> None:
    reasons: list[str] = []
    injector = build_injector(settings(tmp_path), on_fatal=reasons.append)
    assert injector.readiness() == "starting"
    assert injector.tls.cert == ("CP_TOKEN_INJECT_TLS_CERT_FILE", str(tmp_path / "tls.crt"))
    async with injector.lifespan(injector.app):
        assert injector.readiness() is None
    assert injector.readiness() == "starting" and reasons == []


async def test_a_dead_background_task_is_fatal(tmp_path: Path) -> None:
    reasons: list[str] = []
    injector = build_injector(settings(tmp_path), on_fatal=reasons.append)

    async def dies() -> None:
        raise RuntimeError("bug")

    injector.watcher.run = dies  # type: ignore[method-assign]
    async with injector.lifespan(injector.app):
        for _ in range(100):  # bounded in event-loop rounds, no wall-clock wait
            if reasons:
                break
            await asyncio.sleep(0)
    assert reasons == ["background task file-watcher died"]
