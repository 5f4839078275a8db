"""The CP's metrics: the event-loop counters and histograms expose exactly what prometheus-client's
own would, and the CP's families count what happens."""

from __future__ import annotations

import re
from typing import Any

import pytest

from cp_token import __version__
from cp_token.metrics import NO_METRICS, Metrics


def test_loop_metrics_count() -> None:
    metrics = Metrics()
    metrics.request("issued", "ok", 0.001)
    metrics.request("issued", "ok", 0.002)
    metrics.cache("review", True)
    assert metrics.requests.value("issued", "ok") == 2
    assert metrics.minted.value() == 2
    assert metrics.cache_lookups.value("review", "hit") == 1
    NO_METRICS.request("issued", "ok", 0.1)  # records nothing, raises nothing
    NO_METRICS.cache("review", False)


def test_loop_metrics_expose_what_the_library_s_own_would() -> None:

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

    from cp_token.metrics import LATENCY_BUCKETS, SharedFamilies
    from cp_token.runtime import metrics as shared

    ours, theirs = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
    counter = Counter("c", "Counted", ["outcome", "reason"], registry=theirs)
    histogram = Histogram(
        "h_seconds", "Timed", ["outcome"], buckets=LATENCY_BUCKETS, registry=theirs
    )
    plain = Histogram("p_seconds", "Plain", buckets=LATENCY_BUCKETS, registry=theirs)
    gauge = Gauge("up", "Up", ["dependency"], registry=theirs)
    loop_counter = shared.Counter("c", "Counted", ("outcome", "reason"))
    loop_histogram = shared.Histogram("h_seconds", "Timed", LATENCY_BUCKETS, ("outcome",))
    loop_plain = shared.Histogram("p_seconds", "Plain", LATENCY_BUCKETS, series=[()])
    up = {"kubernetes": 0.0, "idp": 1.0}
    loop_gauge = shared.Gauge(
        "up", "Up", lambda: [((k,), v) for k, v in up.items()], ("dependency",)
    )
    SharedFamilies([loop_counter, loop_histogram, loop_plain, loop_gauge], ours)
    for name, value in up.items():
        gauge.labels(name).set(value)
    plain.observe(0.3)
    loop_plain.observe(0.3)
    for outcome, reason, seconds in [
        ("issued", "ok", 0.0004),
        ("issued", "ok", 0.001),  # on a bound: that bucket
        ("invalid_token", "expired", 3.0),
        ("issued", "ok", 11.0),  # beyond the last bound: +Inf
    ]:
        counter.labels(outcome, reason).inc()
        loop_counter.inc(outcome, reason)
        histogram.labels(outcome).observe(seconds)
        loop_histogram.observe(seconds, outcome)

    def text(render: Any, registry: Any) -> str:  # creation times differ: compare the rest
        return re.sub(r"(_created\{?[^ ]*\}? )[0-9.e+]+", r"\1T", render(registry).decode())

    assert text(generate_latest, ours) == text(generate_latest, theirs)
    assert text(openmetrics, ours) == text(openmetrics, theirs)


def test_readiness_is_a_metric() -> None:
    metrics = Metrics()
    ready = [True]
    metrics.watch(ready=lambda: ready[0])
    assert "cp_token_ready 1.0" in metrics.render().decode()
    ready[0] = False
    assert "cp_token_ready 0.0" in metrics.render().decode()
    # no upstream token expiry without an oidc minter, no min_ttl unless given
    assert "cp_token_idp_token_expiry_timestamp_seconds " not in metrics.render().decode()
    assert "cp_token_min_ttl_seconds " not in metrics.render().decode()


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


@pytest.mark.parametrize(
    ("result", "up"),
    [("201", 1.0), ("200", 1.0), ("404", 1.0), ("403", 0.0), ("500", 0.0), ("timeout", 0.0)],
)
def test_a_kubernetes_call_counts_and_says_whether_the_api_server_is_up(
    result: str, up: float
) -> None:
    metrics = Metrics()
    metrics.kube_call("tokenreview", result, 0.02)
    assert metrics.kube_calls.value("tokenreview", result) == 1
    assert sample(metrics, "cp_token_kube_api_calls_total", call="tokenreview", result=result) == 1
    assert sample(metrics, "cp_token_kube_api_duration_seconds_count", call="tokenreview") == 1
    assert sample(metrics, "cp_token_dependency_up", dependency="kubernetes") == up


def test_idp_calls_dependencies_and_reviews_in_flight() -> None:
    metrics = Metrics(authn="tokenreview", minter="oidc")
    metrics.idp_call("200", 0.3)
    metrics.idp_call("500", 0.1)
    metrics.dependency("idp", False)
    metrics.review_started()
    metrics.review_started()
    metrics.review_finished()
    assert sample(metrics, "cp_token_idp_calls_total", result="200") == 1
    assert sample(metrics, "cp_token_idp_calls_total", result="500") == 1
    assert sample(metrics, "cp_token_idp_duration_seconds_count") == 2
    assert sample(metrics, "cp_token_dependency_up", dependency="idp") == 0
    assert sample(metrics, "cp_token_reviews_in_flight") == 1
    assert (
        sample(
            metrics, "cp_token_build_info", version=__version__, authn="tokenreview", minter="oidc"
        )
        == 1
    )


def test_only_issued_requests_count_as_minted() -> None:
    metrics = Metrics()
    metrics.request("issued", "ok", 0.001)
    metrics.request("access_denied", "sa_not_allowed", 0.001)
    metrics.request("rate_limited", "rate_limited", 0.001)
    assert metrics.minted.value() == 1
    assert sample(metrics, "cp_token_tokens_issued_total") == 1
    assert sample(metrics, "cp_token_request_duration_seconds_count", outcome="access_denied") == 1


def test_the_idp_token_expiry_is_exposed_once_known() -> None:
    metrics = Metrics(min_ttl=300)
    expiry: list[float | None] = [None]
    metrics.watch(ready=lambda: False, idp_token_expiry=lambda: expiry[0])
    assert sample(metrics, "cp_token_idp_token_expiry_timestamp_seconds") is None
    assert (
        sample(metrics, "cp_token_ready") == 0
        and sample(metrics, "cp_token_min_ttl_seconds") == 300
    )
    expiry[0] = 1_800_000_000.0
    assert sample(metrics, "cp_token_idp_token_expiry_timestamp_seconds") == 1_800_000_000.0
