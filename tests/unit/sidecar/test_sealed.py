"""Sealed mode's light parts: /token refused (403 sealed, 405 for other methods), the proxied-call
counter by protocol, upstream and status class only, and sealed_parts loading the egress and
grpcio only when asked."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cp_token.settings.sidecar import SidecarSettings
from sidecar.sealed import (
    GRPC_CLASSES,
    STATUS_CLASSES,
    ProxyMetrics,
    SealedParts,
    sealed_parts,
    status_class,
)
from tests.fakes.client import Script, ok
from tests.fakes.sealed_rig import SealedRig
from tests.fakes.sidecar_rig import Rig


@pytest.mark.parametrize(
    ("status", "cls"), [(100, "2xx"), (200, "2xx"), (302, "3xx"), (404, "4xx"), (504, "5xx")]
)
def test_status_classes(status: int, cls: str) -> None:
    assert status_class(status) == cls


def test_the_sidecar_loads_neither_httpx_nor_grpc_without_a_grpc_upstream() -> None:
    code = (
        "import sys, sidecar.cli, sidecar.sealed, sidecar.app, sidecar.egress\n"
        "print(sorted(m for m in ('httpx', 'grpc', 'httpcore') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


async def test_sealed_token_route_is_refused(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1")), tmp_path)
    for method in ("GET", "POST"):
        response = await rig.call(method, "/token")
        assert response.status_code == 403
        assert response.json()["error"] == "sealed"
        assert "/upstream/" in response.json()["error_description"]
    put = await rig.call("PUT", "/token")
    assert put.status_code == 405
    assert rig.cp.count == 0  # a refusal costs the CP nothing
    # without the guard header too: nothing to protect, the same answer
    assert (await rig.client.get("/token")).json()["error"] == "sealed"


async def test_metrics_count_by_upstream_and_class_only(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1")), tmp_path)
    await rig.call("GET", "/upstream/api/x?secret=1")
    await rig.call("GET", "/upstream/api/moved")
    await rig.call("GET", "/upstream/api/down")
    page = (await rig.client.get("/metrics")).text
    name = "cp_token_sidecar_proxied_requests_total"
    for cls, value in (("2xx", 1), ("3xx", 1), ("4xx", 0), ("5xx", 1)):
        assert f'{name}{{protocol="http",upstream="api",class="{cls}"}} {value:.1f}' in page
    assert "secret=" not in page and "/moved" not in page and "t1" not in page
    assert json.dumps(page)  # plain text


async def test_unknown_names_are_not_a_metric_label(tmp_path: Path) -> None:
    rig = SealedRig(Script(ok("t1")), tmp_path)
    await rig.call("GET", "/upstream/made-up-name/x")
    assert "made-up-name" not in (await rig.client.get("/metrics")).text


def test_grpc_codes_count_in_the_http_class_they_map_to() -> None:
    metrics = ProxyMetrics(["api"], "api.example:443")
    for code in ("OK", "NOT_FOUND", "UNAUTHENTICATED", "UNAVAILABLE", "MADE_UP"):
        metrics.grpc(code)
    metrics.http("api", 204)
    metrics.http("not-configured", 500)  # never a new label value
    counts = {key: c.value for key, c in metrics.counters.items() if c.value}
    assert counts == {
        ("grpc", "api.example:443", "2xx"): 1,
        ("grpc", "api.example:443", "4xx"): 2,
        ("grpc", "api.example:443", "5xx"): 2,  # an unknown code is a server error
        ("http", "api", "2xx"): 1,
    }
    assert set(GRPC_CLASSES.values()) <= set(STATUS_CLASSES)
    assert len(metrics.family.samples()) == 8  # 4 classes x 2 upstreams, and nothing else


def test_without_a_grpc_target_grpc_calls_are_not_counted() -> None:
    metrics = ProxyMetrics(["api"], None)
    metrics.grpc("OK")
    assert all(c.value == 0 for c in metrics.counters.values())


async def test_a_plain_sidecar_has_no_sealed_parts(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1")), tmp_path)
    parts = await sealed_parts(
        SidecarSettings(cp_token_url="http://127.0.0.1:9/token"), rig.refresher, rig.metrics
    )
    assert parts == SealedParts()
    names = {f.name for f in rig.metrics.registry.families}
    assert not [n for n in names if "proxied" in n]  # no proxied-call series


async def test_a_sealed_sidecar_with_upstreams_gets_the_egress_and_its_metrics(
    tmp_path: Path,
) -> None:
    rig = Rig(Script(ok("t1")), tmp_path)
    settings = SidecarSettings(
        cp_token_url="http://127.0.0.1:9/token",
        sealed=True,
        upstreams=(("api", "https://api.example/v1"),),
    )
    parts = await sealed_parts(settings, rig.refresher, rig.metrics)
    assert parts.token_route is not None
    assert list(parts.prefixes) == ["/upstream/"]
    assert len(parts.contexts) == 1
    assert [f.name for f in rig.metrics.registry.families if "proxied" in f.name] == [
        "cp_token_sidecar_proxied_requests"
    ]
    async with parts.contexts[0]():  # the egress pool is closed on the way out
        pass
    assert "cp_token_sidecar_proxied_requests_total" in rig.metrics.render().decode()


async def test_a_busy_grpc_port_is_an_os_error(tmp_path: Path) -> None:
    rig = Rig(Script(ok("t1")), tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = SidecarSettings(
            cp_token_url="http://127.0.0.1:9/token",
            sealed=True,
            grpc_upstream="api.example:443",
            grpc_listen_port=port,
        )
        with pytest.raises(OSError):
            await sealed_parts(settings, rig.refresher, rig.metrics)
