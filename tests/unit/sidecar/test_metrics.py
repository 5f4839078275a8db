"""The sidecar's hand-rendered Prometheus exposition, checked with prometheus_client's own parser
(a format slip fails here rather than in a scrape): counts by method and outcome, cumulative
buckets, the holder's gauges read at scrape time, label values escaped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cp_token.client import FetchedToken
from cp_token.runtime.clock import FakeClock
from cp_token.runtime.metrics import Counter
from sidecar.holder import State, TokenHolder
from sidecar.metrics import SidecarMetrics
from tests.fakes.client import Script, ok, unavailable
from tests.fakes.sidecar_rig import Rig


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


def test_the_holder_gauges_with_nothing_held_and_an_opaque_token() -> None:
    clock = FakeClock()
    holder = TokenHolder(clock)
    families = _families(SidecarMetrics(holder).render().decode())
    assert families["cp_token_sidecar_token_expires_in_seconds"].samples[0].value == 0.0
    assert families["cp_token_sidecar_ready"].samples[0].value == 0.0
    states = {s.labels["state"]: s.value for s in families["cp_token_sidecar_token_state"].samples}
    assert states == {state.value: float(state is State.EMPTY) for state in State}
    holder.begin_fetch()
    holder.succeeded(FetchedToken("opaque", None, None, clock.monotonic()))
    families = _families(SidecarMetrics(holder).render().decode())
    assert families["cp_token_sidecar_token_expires_in_seconds"].samples[0].value == -1.0
    assert families["cp_token_sidecar_ready"].samples[0].value == 1.0


def test_extra_series_are_rendered_after_the_sidecar_s_own_with_labels_escaped() -> None:
    metrics = SidecarMetrics(TokenHolder(FakeClock()))
    counter = Counter("x_total", "Extra.", ("name",))
    counter.labels('a"b\\c\nd').inc(2)
    metrics.add(counter)
    text = metrics.render().decode()
    assert text.endswith('x_total{name="a\\"b\\\\c\\nd"} 2.0\n')
    (sample,) = _families(text)["x"].samples
    assert sample.labels == {"name": 'a"b\\c\nd'} and sample.value == 2.0
    assert metrics.requests[("other", "not_allowed")].value == 0
    metrics.request("DELETE", "not_allowed")  # every other method counts as one
    assert metrics.requests[("other", "not_allowed")].value == 1
