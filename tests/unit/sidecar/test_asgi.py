"""The sidecar's framework-free ASGI pieces: the exact-path router, its lifespan, the probes'
methods. (The hand-rendered exposition: test_metrics.py.)"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from sidecar.asgi import Message, Router
from tests.fakes.client import Script, ok
from tests.fakes.sidecar_rig import Rig


async def test_unknown_paths_are_404_and_probes_are_get_or_head_only(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1")), tmp_path)
    assert (await rig.client.get("/nope")).status_code == 404
    assert (await rig.client.get("/token/")).status_code == 404
    head = await rig.client.head("/healthz")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == "2"
    for method in ("POST", "PUT", "DELETE"):
        response = await rig.client.request(method, "/healthz")
        assert response.status_code == 405
        assert response.headers["allow"] == "GET, HEAD"


async def _drive_lifespan(app: Router, fail_on: str | None = None) -> list[str]:
    """Run the ASGI lifespan protocol the way a server does; the messages sent back."""
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message["type"])

    with contextlib.suppress(RuntimeError):
        await app({"type": "lifespan"}, receive, send)
    return sent


async def test_the_lifespan_protocol_runs_the_context_and_reports_failures() -> None:
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        events.append("start")
        yield
        events.append("stop")

    sent = await _drive_lifespan(Router({}, lifespan=lifespan))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert events == ["start", "stop"]

    @contextlib.asynccontextmanager
    async def broken() -> AsyncIterator[None]:
        raise RuntimeError("cannot start")
        yield  # pragma: no cover

    assert await _drive_lifespan(Router({}, lifespan=broken)) == ["lifespan.startup.failed"]
    assert await _drive_lifespan(Router({})) == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
