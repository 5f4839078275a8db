"""Service wiring: a dead background task stops the process; readiness comes from the minter."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from cp_token.identity import Identity
from cp_token.minters import IssuedToken
from cp_token.settings.cp import load_settings
from cp_token.wiring import Service, build_service


class DyingMinter:
    problem = None

    async def mint(self, identity: Identity) -> IssuedToken:
        return IssuedToken("x", None)

    async def run(self) -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("refresher crashed")

    async def aclose(self) -> None:
        pass


def static_service(tmp_path: Path, on_fatal: Callable[[str], None] | None = None) -> Service:
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps({"identities": []}))
    settings = load_settings(
        {
            "CP_TOKEN_AUTHN": "static",
            "CP_TOKEN_STATIC_IDENTITIES_FILE": str(ids),
            "CP_TOKEN_MINTER": "static",
            "CP_TOKEN_STATIC_TOKEN": "t",
        }
    )
    return build_service(settings, on_fatal=on_fatal)


async def test_dead_background_task_is_fatal(tmp_path: Path) -> None:
    base = static_service(tmp_path)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    reasons: list[str] = []
    service = Service(**{**fields, "minter": DyingMinter(), "on_fatal": reasons.append})
    async with service.lifespan(service.app):
        for _ in range(100):
            if reasons:
                break
            await asyncio.sleep(0.01)
    assert reasons == ["background task minter died"]


async def test_minter_without_background_work_is_not_fatal(tmp_path: Path) -> None:
    reasons: list[str] = []
    service = static_service(tmp_path, on_fatal=reasons.append)
    async with service.lifespan(service.app):
        await asyncio.sleep(0.05)
    assert reasons == []
    assert service.readiness() is None
