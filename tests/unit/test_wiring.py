"""Service wiring: a dead background task stops the process; readiness comes from the minter;
the metrics are wired to readiness, the minimum lifetime and the oidc minter's upstream token."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from cp_token.identity import Identity
from cp_token.minters import IssuedToken
from cp_token.settings.cp import load_settings
from cp_token.wiring import Service, build_service
from tests.fakes.idp import FakeIdP
from tests.fakes.loop import run_until, spin


class DyingMinter:
    problem = None

    async def mint(self, identity: Identity) -> IssuedToken:
        return IssuedToken("x", None)

    async def run(self) -> None:
        await asyncio.sleep(0)  # dies once running, not at its start
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
        await run_until(lambda: reasons, "the minter's death reported")
    assert reasons == ["background task minter died"]


async def test_minter_without_background_work_is_not_fatal(tmp_path: Path) -> None:
    reasons: list[str] = []
    service = static_service(tmp_path, on_fatal=reasons.append)
    async with service.lifespan(service.app):
        await spin(200)  # the static minter's run has returned by now: allowed
    assert reasons == []
    assert service.readiness() is None


ROOT = Path(__file__).resolve().parents[2]


DEV_IDENTITIES = str(ROOT / "examples" / "config" / "dev-identities.json")


def test_the_service_wires_readiness_and_min_ttl() -> None:
    settings = load_settings(
        {
            "CP_TOKEN_AUTHN": "static",
            "CP_TOKEN_STATIC_IDENTITIES_FILE": DEV_IDENTITIES,
            "CP_TOKEN_MINTER": "static",
            "CP_TOKEN_STATIC_TOKEN": "t",
            "CP_TOKEN_MIN_TTL": "120",
        }
    )
    text = build_service(settings).metrics.render().decode()
    assert "cp_token_ready 1.0" in text
    assert "cp_token_min_ttl_seconds 120.0" in text


async def test_the_oidc_minters_upstream_token_expiry_is_a_metric(idp: FakeIdP) -> None:
    from cp_token.identity import Identity

    settings = load_settings(
        {
            "CP_TOKEN_AUTHN": "static",
            "CP_TOKEN_STATIC_IDENTITIES_FILE": DEV_IDENTITIES,
            "CP_TOKEN_MINTER": "oidc",
            "OIDC_TOKEN_URL": idp.token_url,
            "OIDC_CLIENT_ID": idp.client_id,
            "OIDC_CLIENT_SECRET": idp.client_secret,
        }
    )
    service = build_service(settings)
    try:
        before = service.metrics.render().decode()
        assert "cp_token_idp_token_expiry_timestamp_seconds " not in before  # none held yet
        start = time.time()
        await service.minter.mint(Identity("system:serviceaccount:s:session-1-sa"))
        text = service.metrics.render().decode()
        m = re.search(r"^cp_token_idp_token_expiry_timestamp_seconds (\S+)$", text, re.M)
        assert m, text
        # the fake IdP's tokens live 3600 s
        assert start + 3590 <= float(m.group(1)) <= time.time() + 3600
    finally:
        await service.minter.aclose()
