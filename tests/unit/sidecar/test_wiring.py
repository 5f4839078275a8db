"""The sidecar's wiring: built once from its settings, the CP upstream and how a fatal
failure ends the process; a plain sidecar gets its token file, a sealed one refuses /token."""

from __future__ import annotations

from pathlib import Path

import httpx

from cp_token.client import TokenSource
from cp_token.runtime.clock import FakeClock
from cp_token.settings.sidecar import SidecarSettings
from sidecar.wiring import build_sidecar
from tests.fakes.client import Script, ok

CP_URL = "https://cp.example/token"
GUARD = {"Ambient-Token-Request": "true"}


def source(tmp_path: Path) -> TokenSource:
    sa = tmp_path / "sa"
    sa.write_text("sa.jwt.token")
    return TokenSource(
        cp_url=CP_URL, sa_token_file=str(sa), async_transport=Script(ok("t1")).async_()
    )


async def get(app: object, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8099") as c:
        return await c.get(path, headers=GUARD)


async def test_a_plain_sidecar_holds_nothing_until_its_loop_runs(tmp_path: Path) -> None:
    settings = SidecarSettings(CP_URL, token_file=str(tmp_path / "token"))
    fatal: list[BaseException] = []
    sidecar = await build_sidecar(settings, source(tmp_path), fatal.append, FakeClock())
    assert not sidecar.holder.ready
    assert (await get(sidecar.metrics_app, "/readyz")).status_code == 503
    assert fatal == [] and not (tmp_path / "token").exists()


async def test_a_sealed_sidecar_refuses_the_token_route(tmp_path: Path) -> None:
    settings = SidecarSettings(CP_URL, sealed=True, upstreams=(("api", "https://api.example"),))
    sidecar = await build_sidecar(settings, source(tmp_path), lambda exc: None, FakeClock())
    resp = await get(sidecar.app, "/token")
    assert resp.status_code == 403 and resp.json()["error"] == "sealed"
