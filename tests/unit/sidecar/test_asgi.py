"""The sidecar's framework-free pieces: the exact-path router, its lifespan, the probes'
methods, and the hand-rendered Prometheus exposition (checked with prometheus_client's own
parser, so a format slip fails here rather than in a scrape)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from cp_token.client._http import client_options
from cp_token.runtime.clock import FakeClock
from sidecar.asgi import Message, Router
from sidecar.holder import TokenHolder
from sidecar.metrics import SidecarMetrics
from tests.fakes.client import Script, ok, unavailable
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


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


async def test_the_exposition_parses_and_counts(tmp_path: Path) -> None:
    rig = Rig(Script(unavailable(503), ok("tok-secret-xyz", 600)), tmp_path)
    await rig.get()  # 503 from the CP: no token held
    rig.clock.advance(60)  # past the backoff after a transient failure
    await rig.get()
    await rig.get(headers={"Origin": "http://evil.example"})
    response = await rig.client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert "tok-secret-xyz" not in text
    families = _families(text)
    requests = {
        (s.labels["method"], s.labels["outcome"]): s.value
        for s in families["cp_token_sidecar_token_requests"].samples
    }
    assert requests[("GET", "ok")] == 1.0
    assert requests[("GET", "unavailable")] == 1.0
    assert requests[("GET", "refused")] == 1.0
    assert requests[("POST", "ok")] == 0.0
    fetches = {
        s.labels["outcome"]: s.value for s in families["cp_token_sidecar_upstream_fetches"].samples
    }
    assert fetches == {"ok": 1.0, "transient": 1.0, "rejected": 0.0, "error": 0.0}
    histogram = families["cp_token_sidecar_upstream_fetch_seconds"]
    assert histogram.type == "histogram"
    count = [s.value for s in histogram.samples if s.name.endswith("_count")]
    assert count == [2.0]
    gauges = {f: families[f].samples[0].value for f in ("cp_token_sidecar_ready",)}
    assert gauges == {"cp_token_sidecar_ready": 1.0}
    states = {s.labels["state"]: s.value for s in families["cp_token_sidecar_token_state"].samples}
    assert states["fresh"] == 1.0
    assert sum(states.values()) == 1.0
    info = families["cp_token_sidecar_build_info"].samples[0]
    assert info.labels["version"]
    assert families["cp_token_sidecar_token_expires_in_seconds"].samples[0].value == 600.0


def test_counters_refuse_to_go_down() -> None:
    metrics = SidecarMetrics(TokenHolder(FakeClock()))
    with pytest.raises(ValueError, match="only go up"):
        metrics.fetches["ok"].inc(-1)


def test_an_http_endpoint_loads_no_ca_store() -> None:
    plain = client_options(None, 5.0, tls=False)["verify"]
    assert plain.get_ca_certs() == []
    assert plain.verify_mode.name == "CERT_REQUIRED"  # still verifies: trusts nothing
    assert plain.check_hostname


def test_an_https_endpoint_loads_the_given_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    context = client_options(str(bundle), 5.0, tls=True)["verify"]
    assert len(context.get_ca_certs()) == 1
